// Package client is a small typed Go client for the ModelLifecycle control plane
// (modellifecycle.v1): models, sources, builds, deployments, operations and watches.
//
//	c, err := client.Dial("127.0.0.1:50051")
//	defer c.Close()
//	model, err := c.CreateModel(ctx, "projects/default", "iris", nil)
//	source, err := c.UploadSource(ctx, model.Name, "examples/iris-v1")
//	op, err := c.CreateBuild(ctx, model.Name, source.Sha256, "model.py", "predict",
//		&client.DeployOptions{Resources: &client.Resources{Replicas: 2}})
//	op, err = c.Wait(ctx, op.Name, func(op *client.Operation) { fmt.Println(op.Progress) })
//
// Messages are the generated ones (package modellifecycle/v1), re-exported here as
// aliases. Errors from the server come back as *Error (code, ErrorInfo reason and
// metadata, BadRequest field violations); use errors.As.
package client

import (
	"bytes"
	"context"
	"errors"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "modellifecycle/v1"
)

// The generated messages, under shorter names.
type (
	Model         = pb.Model
	Build         = pb.Build
	Deployment    = pb.Deployment
	Replica       = pb.Replica
	Resources     = pb.Resources
	DeployOptions = pb.DeployOptions
	Operation     = pb.Operation
	Source        = pb.Source
	ModelEvent    = pb.ModelEvent
)

// ChunkSize is the size of each UploadSource message.
const ChunkSize = 256 * 1024

// Client wraps a connection to `modelctl serve`'s gRPC address.
type Client struct {
	conn *grpc.ClientConn
	rpc  pb.ModelLifecycleClient

	// ProgressEvery is how long one WaitOperation call of Wait lasts at most: Wait
	// reports progress at least this often and sees the end as soon as it is recorded.
	ProgressEvery time.Duration
}

// Dial connects to addr (host:port) without transport security: for a local
// `modelctl serve`. opts are added after the client's own, e.g.
// grpc.WithPerRPCCredentials. Dial does not wait for the server: the first call does.
func Dial(addr string, opts ...grpc.DialOption) (*Client, error) {
	conn, err := grpc.Dial(addr, append([]grpc.DialOption{grpc.WithInsecure()}, opts...)...)
	if err != nil {
		return nil, err
	}
	return New(conn), nil
}

// New uses a connection you dialed yourself (with TLS, say).
func New(conn *grpc.ClientConn) *Client {
	return &Client{conn: conn, rpc: pb.NewModelLifecycleClient(conn), ProgressEvery: 500 * time.Millisecond}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// RPC is the generated stub, for the RPCs this wrapper does not cover (errors from it
// are plain gRPC status errors: FromError decodes them).
func (c *Client) RPC() pb.ModelLifecycleClient { return c.rpc }

// ---- models ---------------------------------------------------------------------------

// CreateModel creates parent/models/modelID (parent: "projects/{project}"); model
// (display name, description) may be nil.
func (c *Client) CreateModel(ctx context.Context, parent, modelID string, model *Model) (*Model, error) {
	m, err := c.rpc.CreateModel(ctx, &pb.CreateModelRequest{Parent: parent, ModelId: modelID, Model: model})
	return m, FromError(err)
}

// GetModel reads projects/{project}/models/{model}.
func (c *Client) GetModel(ctx context.Context, name string) (*Model, error) {
	m, err := c.rpc.GetModel(ctx, &pb.GetModelRequest{Name: name})
	return m, FromError(err)
}

// DeleteModel deletes a model that is not active (FAILED_PRECONDITION otherwise).
func (c *Client) DeleteModel(ctx context.Context, name string) error {
	_, err := c.rpc.DeleteModel(ctx, &pb.DeleteModelRequest{Name: name})
	return FromError(err)
}

// ---- sources and builds ---------------------------------------------------------------

// UploadSource zips dir (see ZipDirectory) and streams it to the model in chunks.
// The returned Source's Sha256 is what CreateBuild takes.
func (c *Client) UploadSource(ctx context.Context, model, dir string) (*Source, error) {
	var buf bytes.Buffer
	if _, err := ZipDirectory(dir, &buf); err != nil {
		return nil, err
	}
	return c.UploadZip(ctx, model, &buf)
}

// UploadZip streams a zip read from r to the model in ChunkSize messages.
func (c *Client) UploadZip(ctx context.Context, model string, r io.Reader) (*Source, error) {
	if model == "" {
		return nil, errNoParent
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // a failed read ends the call: the server never stores a partial zip
	stream, err := c.rpc.UploadSource(ctx)
	if err != nil {
		return nil, FromError(err)
	}
	chunk := make([]byte, ChunkSize)
	first := true
	for {
		n, readErr := io.ReadFull(r, chunk)
		if n > 0 || first {
			msg := &pb.UploadSourceRequest{Chunk: append([]byte(nil), chunk[:n]...)}
			if first {
				msg.Parent, first = model, false
			}
			if err := stream.Send(msg); err != nil {
				if errors.Is(err, io.EOF) { // the server ended the call: its status says why
					_, err = stream.CloseAndRecv()
				}
				return nil, FromError(err)
			}
		}
		if readErr == io.EOF || readErr == io.ErrUnexpectedEOF {
			break
		}
		if readErr != nil {
			return nil, readErr
		}
	}
	source, err := stream.CloseAndRecv()
	return source, FromError(err)
}

// CreateBuild builds an uploaded source: filePath (relative, inside the zip) must
// define functionName. With deploy set, the build is deployed once built and the
// Operation is done when the deployment is DEPLOYED or has failed.
func (c *Client) CreateBuild(ctx context.Context, model, sourceSHA256, filePath, functionName string, deploy *DeployOptions) (*Operation, error) {
	op, err := c.rpc.CreateBuild(ctx, &pb.CreateBuildRequest{
		Parent:       model,
		SourceSha256: sourceSHA256,
		FilePath:     filePath,
		FunctionName: functionName,
		Deploy:       deploy,
	})
	return op, FromError(err)
}

// GetBuild reads projects/{project}/models/{model}/builds/{version}.
func (c *Client) GetBuild(ctx context.Context, name string) (*Build, error) {
	b, err := c.rpc.GetBuild(ctx, &pb.GetBuildRequest{Name: name})
	return b, FromError(err)
}

// ---- deployments ----------------------------------------------------------------------

// CreateDeployment re-deploys a build of the model: the active one with new resources
// (only replicas changed: scaled in place), or another one (rollback). environment
// may be nil.
func (c *Client) CreateDeployment(ctx context.Context, model, build string, resources *Resources, environment map[string]string) (*Operation, error) {
	op, err := c.rpc.CreateDeployment(ctx, &pb.CreateDeploymentRequest{
		Parent:      model,
		Build:       build,
		Resources:   resources,
		Environment: environment,
	})
	return op, FromError(err)
}

// GetDeployment reads projects/{project}/models/{model}/deployments/{n}.
func (c *Client) GetDeployment(ctx context.Context, name string) (*Deployment, error) {
	d, err := c.rpc.GetDeployment(ctx, &pb.GetDeploymentRequest{Name: name})
	return d, FromError(err)
}

// StopModel stops every replica; the model becomes STOPPED.
func (c *Client) StopModel(ctx context.Context, name string) (*Operation, error) {
	op, err := c.rpc.StopModel(ctx, &pb.StopModelRequest{Name: name})
	return op, FromError(err)
}

// RestartModel replaces every replica of the active deployment (a STOPPED model
// starts again with its last deployment).
func (c *Client) RestartModel(ctx context.Context, name string) (*Operation, error) {
	op, err := c.rpc.RestartModel(ctx, &pb.RestartModelRequest{Name: name})
	return op, FromError(err)
}

// ---- operations -----------------------------------------------------------------------

// GetOperation reads operations/{id}.
func (c *Client) GetOperation(ctx context.Context, name string) (*Operation, error) {
	op, err := c.rpc.GetOperation(ctx, &pb.GetOperationRequest{Name: name})
	return op, FromError(err)
}

// CancelOperation stops a running build or deploy; returns the operation once done.
func (c *Client) CancelOperation(ctx context.Context, name string) (*Operation, error) {
	op, err := c.rpc.CancelOperation(ctx, &pb.CancelOperationRequest{Name: name})
	return op, FromError(err)
}

// Wait follows an operation until it is done, calling onProgress (may be nil) first
// and then whenever its progress or done flag changes. It returns the done Operation
// and, if the operation failed, its error as *Error (OperationError). Bound it with
// ctx: when ctx ends first, the operation itself goes on.
func (c *Client) Wait(ctx context.Context, name string, onProgress func(*Operation)) (*Operation, error) {
	op, err := c.GetOperation(ctx, name)
	if err != nil {
		return nil, err
	}
	every := c.ProgressEvery
	if every <= 0 {
		every = 500 * time.Millisecond
	}
	reported := false
	var lastProgress string
	var lastDone bool
	for {
		if onProgress != nil && (!reported || op.GetProgress() != lastProgress || op.GetDone() != lastDone) {
			onProgress(op)
		}
		reported, lastProgress, lastDone = true, op.GetProgress(), op.GetDone()
		if op.GetDone() {
			return op, OperationError(op)
		}
		next, err := c.rpc.WaitOperation(ctx, &pb.WaitOperationRequest{Name: name, Timeout: durationpb.New(every)})
		if err != nil {
			return op, FromError(err)
		}
		op = next
	}
}

// ---- watch ----------------------------------------------------------------------------

// Watch is a WatchModel stream: Recv until it returns an error, then Close.
type Watch struct {
	stream pb.ModelLifecycle_WatchModelClient
	cancel context.CancelFunc
}

// Recv is the next event. The stream ends with io.EOF when the server ends it, or
// with *Error (CANCELLED after Close or when the context ends; OUT_OF_RANGE when
// sinceRevision is older than the server keeps).
func (w *Watch) Recv() (*ModelEvent, error) {
	ev, err := w.stream.Recv()
	if err == io.EOF {
		return nil, err
	}
	return ev, FromError(err)
}

// Close ends the watch.
func (w *Watch) Close() { w.cancel() }

// WatchModel follows a model: with sinceRevision 0, its current state first (CURRENT
// events), then every change in order; above 0, exactly the events after that revision.
func (c *Client) WatchModel(ctx context.Context, name string, sinceRevision int64) (*Watch, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.rpc.WatchModel(ctx, &pb.WatchModelRequest{Name: name, SinceRevision: sinceRevision})
	if err != nil {
		cancel()
		return nil, FromError(err)
	}
	return &Watch{stream: stream, cancel: cancel}, nil
}

// CreateInvocationKey makes a new key for model's endpoint. The secret (in the response,
// shown once) goes in `Authorization: Bearer <secret>` on requests to the endpoint; the
// replicas take a new key, or a revocation, within seconds.
func (c *Client) CreateInvocationKey(ctx context.Context, model, description string) (*pb.CreateInvocationKeyResponse, error) {
	r, err := c.rpc.CreateInvocationKey(ctx, &pb.CreateInvocationKeyRequest{Parent: model, Description: description})
	return r, FromError(err)
}

// RevokeInvocationKey stops a key working (name: projects/P/models/M/keys/ID).
func (c *Client) RevokeInvocationKey(ctx context.Context, name string) (*pb.InvocationKey, error) {
	k, err := c.rpc.RevokeInvocationKey(ctx, &pb.RevokeInvocationKeyRequest{Name: name})
	return k, FromError(err)
}
