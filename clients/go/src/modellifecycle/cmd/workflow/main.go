// Command workflow runs the active-model workflow against a running `modelctl serve`
// with the Go client:
//
//	workflow -server 127.0.0.1:50051 -source examples/iris-v1
//
// It shows how a bad request comes back (code, ErrorInfo reason, field violations),
// creates a model, follows the model's events in the background, uploads and builds
// the source and deploys it with 2 replicas (progress printed as it goes), calls the
// endpoint, scales to 3 replicas in place, restarts, and stops. It exits non-zero at
// the first thing that does not go as expected.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"

	"modellifecycle/client"
	pb "modellifecycle/v1"
)

func main() {
	server := flag.String("server", "127.0.0.1:50051", "modelctl serve's gRPC address")
	project := flag.String("project", "projects/default", "the project to create the model in")
	modelID := flag.String("model-id", "iris-from-go", "the new model's id")
	source := flag.String("source", "examples/iris-v1", "folder with the model's code (model.py, function predict)")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up after this long")
	tokenFile := flag.String("token-file", "", "file holding the token (e.g. DATA_DIR/admin.token); none: no token")
	flag.Parse()

	var opts []grpc.DialOption
	if *tokenFile != "" {
		token, err := client.ReadToken(*tokenFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "workflow failed:", err)
			os.Exit(1)
		}
		opts = append(opts, client.WithToken(token))
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	err := run(ctx, *server, *project, *modelID, *source, opts...)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "workflow failed:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, server, project, modelID, source string, opts ...grpc.DialOption) error {
	c, err := client.Dial(server, opts...)
	if err != nil {
		return err
	}
	defer c.Close()

	// A bad request: the error carries the gRPC code, the reason and the fields.
	_, err = c.CreateModel(ctx, project, "Not A Valid Id", nil)
	var bad *client.Error
	if !errors.As(err, &bad) {
		return fmt.Errorf("an invalid model id was not refused with a status: %v", err)
	}
	fmt.Printf("bad request -> %s %s %s\n", bad.CodeName(), bad.Reason, client.FormatViolations(bad.Violations))

	model, err := c.CreateModel(ctx, project, modelID, nil)
	if err != nil {
		return fmt.Errorf("create model: %w", err)
	}
	name := model.GetName()
	fmt.Printf("created %s\n", name)

	// Every change of the model, live: the current state first, then each event.
	watch, err := c.WatchModel(ctx, name, 0)
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	var watching sync.WaitGroup
	watching.Add(1)
	go func() {
		defer watching.Done()
		follow(watch)
	}()
	defer func() {
		watch.Close()
		watching.Wait()
	}()

	src, err := c.UploadSource(ctx, name, source)
	if err != nil {
		return fmt.Errorf("upload %s: %w", source, err)
	}
	fmt.Printf("uploaded %s: %d bytes, sha256 %s\n", source, src.GetSizeBytes(), src.GetSha256())

	deploy := &client.DeployOptions{Resources: &client.Resources{Replicas: 2}}
	op, err := c.CreateBuild(ctx, name, src.GetSha256(), "model.py", "predict", deploy)
	if err != nil {
		return fmt.Errorf("create build: %w", err)
	}
	if op, err = c.Wait(ctx, op.GetName(), progress); err != nil {
		return fmt.Errorf("build and deploy: %w", err)
	}
	build := op.GetTarget()
	fmt.Printf("built %s\n", build)

	model, err = c.GetModel(ctx, name)
	if err != nil {
		return err
	}
	if err := call(ctx, c, name, model.GetEndpoint()); err != nil {
		return err
	}

	// Scale in place: the same build, only the replica count changes.
	before, err := replicaIDs(ctx, c, name)
	if err != nil {
		return err
	}
	if op, err = c.CreateDeployment(ctx, name, build, &client.Resources{Replicas: 3}, nil); err != nil {
		return fmt.Errorf("scale: %w", err)
	}
	if _, err = c.Wait(ctx, op.GetName(), progress); err != nil {
		return fmt.Errorf("scale: %w", err)
	}
	model, err = c.GetModel(ctx, name)
	if err != nil {
		return err
	}
	after, err := replicaIDs(ctx, c, name)
	if err != nil {
		return err
	}
	if model.GetState() != pb.ModelState_MODEL_STATE_DEPLOYED || len(after) != 3 {
		return fmt.Errorf("after scaling to 3: %s with %d replicas", modelState(model), len(after))
	}
	fmt.Printf("  %d of %d replicas kept their id\n", kept(before, after), len(before))
	fmt.Printf("scaled: %s with %d replicas\n", modelState(model), len(after))

	if op, err = c.RestartModel(ctx, name); err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	if _, err = c.Wait(ctx, op.GetName(), progress); err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	if model, err = c.GetModel(ctx, name); err != nil {
		return err
	}
	restarted, err := replicaIDs(ctx, c, name)
	if err != nil {
		return err
	}
	fmt.Printf("restarted: %s, %d of %d replicas new\n", modelState(model), len(restarted)-kept(after, restarted), len(restarted))

	if op, err = c.StopModel(ctx, name); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	if _, err = c.Wait(ctx, op.GetName(), progress); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	if model, err = c.GetModel(ctx, name); err != nil {
		return err
	}
	if model.GetState() != pb.ModelState_MODEL_STATE_STOPPED {
		return fmt.Errorf("after stop: %s", modelState(model))
	}
	fmt.Printf("stopped: %s\n", modelState(model))
	return nil
}

// progress prints an operation as it goes: "  create_build: deployed (done)".
func progress(op *client.Operation) {
	done := ""
	if op.GetDone() {
		done = " (done)"
	}
	kind := strings.ToLower(strings.TrimPrefix(op.GetKind().String(), "OPERATION_KIND_"))
	fmt.Printf("  %s: %s%s\n", kind, op.GetProgress(), done)
}

// follow prints each event until the watch ends (Close, or the server goes).
func follow(w *client.Watch) {
	for {
		ev, err := w.Recv()
		if err != nil {
			if err != io.EOF && !errors.Is(err, context.Canceled) {
				fmt.Fprintln(os.Stderr, "watch ended:", err)
			}
			return
		}
		kind, state := "", ""
		switch r := ev.GetResource().(type) {
		case *pb.ModelEvent_Model:
			kind, state = "Model", modelState(r.Model)
		case *pb.ModelEvent_Build:
			kind, state = "Build", strings.TrimPrefix(r.Build.GetState().String(), "BUILD_STATE_")
		case *pb.ModelEvent_Deployment:
			kind, state = "Deployment", strings.TrimPrefix(r.Deployment.GetState().String(), "DEPLOYMENT_STATE_")
		case *pb.ModelEvent_Operation:
			kind, state = "Operation", r.Operation.GetProgress()
		default:
			continue // a BOOKMARK: only a revision
		}
		eventType := strings.TrimPrefix(ev.GetType().String(), "EVENT_TYPE_")
		fmt.Printf("  event %d: %s %s %s\n", ev.GetRevision(), eventType, kind, state)
	}
}

// post POSTs one iris flower to the model's endpoint, with an invocation key if given.
func post(ctx context.Context, endpoint, key string) (int, []byte, error) {
	body := []byte(`{"features": [[5.1, 3.5, 1.4, 0.2]]}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("POST %s: %w", endpoint, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, fmt.Errorf("POST %s: %w", endpoint, err)
	}
	return resp.StatusCode, raw, nil
}

// call makes an invocation key for the model, then POSTs one iris flower with it (the
// replicas take a new key within seconds) and prints the answer; first it shows what a
// request without a key gets (401 unless the server runs with --insecure-no-auth).
func call(ctx context.Context, c *client.Client, model, endpoint string) error {
	if endpoint == "" {
		return errors.New("the deployed model has no endpoint")
	}
	status, _, err := post(ctx, endpoint, "")
	if err != nil {
		return err
	}
	fmt.Printf("POST %s without a key -> %d\n", endpoint, status)
	key, err := c.CreateInvocationKey(ctx, model, "go example")
	if err != nil {
		return err
	}
	fmt.Printf("created invocation key %s\n", key.GetKey().GetName())
	var raw []byte
	for i := 0; i < 100; i++ {
		if status, raw, err = post(ctx, endpoint, key.GetSecret()); err != nil || status != http.StatusUnauthorized {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	var answer struct {
		Response json.RawMessage `json:"response"`
	}
	if status != http.StatusOK || json.Unmarshal(raw, &answer) != nil || answer.Response == nil {
		return fmt.Errorf("POST %s -> %d %s", endpoint, status, raw)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, answer.Response); err != nil {
		return err
	}
	fmt.Printf("POST %s with the key -> %d %s\n", endpoint, status, compact.String())
	return nil
}

// replicaIDs are the ids of the active deployment's replicas.
func replicaIDs(ctx context.Context, c *client.Client, name string) ([]string, error) {
	model, err := c.GetModel(ctx, name)
	if err != nil {
		return nil, err
	}
	if model.GetActiveDeployment() == "" {
		return nil, fmt.Errorf("%s has no active deployment", name)
	}
	d, err := c.GetDeployment(ctx, model.GetActiveDeployment())
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(d.GetReplicas()))
	for _, r := range d.GetReplicas() {
		ids = append(ids, r.GetId())
	}
	return ids, nil
}

// kept counts the ids of before that are still in after.
func kept(before, after []string) int {
	now := make(map[string]bool, len(after))
	for _, id := range after {
		now[id] = true
	}
	n := 0
	for _, id := range before {
		if now[id] {
			n++
		}
	}
	return n
}

func modelState(m *client.Model) string {
	return strings.TrimPrefix(m.GetState().String(), "MODEL_STATE_")
}
