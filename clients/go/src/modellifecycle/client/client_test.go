package client

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	pb "modellifecycle/v1"
)

// ---- zip ------------------------------------------------------------------------------

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func zipEntries(t *testing.T, data []byte) map[string]*zip.File {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatalf("not a zip: %v", err)
	}
	entries := map[string]*zip.File{}
	for _, f := range zr.File {
		entries[f.Name] = f
	}
	return entries
}

func readEntry(t *testing.T, f *zip.File) string {
	t.Helper()
	r, err := f.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestZipDirectoryStoresSourcesAndLeavesCachesOut(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "model.py"), "def predict(body):\n    return body\n")
	write(t, filepath.Join(dir, "requirements.txt"), "scikit-learn\n")
	write(t, filepath.Join(dir, "pkg", "helper.py"), "X = 1\n")
	write(t, filepath.Join(dir, "__pycache__", "model.cpython-311.pyc"), "bytecode")
	write(t, filepath.Join(dir, "pkg", "__pycache__", "helper.cpython-311.pyc"), "bytecode")
	write(t, filepath.Join(dir, "stray.pyc"), "bytecode")
	write(t, filepath.Join(dir, ".git", "config"), "[core]")
	write(t, filepath.Join(dir, ".venv", "bin", "python"), "")
	write(t, filepath.Join(dir, ".DS_Store"), "")
	outside := t.TempDir()
	write(t, filepath.Join(outside, "data.txt"), "linked content")
	if err := os.Symlink(filepath.Join(outside, "data.txt"), filepath.Join(dir, "data.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(dir, "linked-folder")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(dir, "missing"), filepath.Join(dir, "dangling")); err != nil {
		t.Fatal(err)
	}

	var buf bytes.Buffer
	names, err := ZipDirectory(dir, &buf)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"data.txt", "model.py", "pkg/helper.py", "requirements.txt"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("names = %q, want %q", names, want)
	}
	entries := zipEntries(t, buf.Bytes())
	if len(entries) != len(want) {
		t.Fatalf("zip holds %d entries, want %d", len(entries), len(want))
	}
	for _, name := range want {
		f, ok := entries[name]
		if !ok {
			t.Fatalf("%s missing from the zip", name)
		}
		if f.Method != zip.Deflate {
			t.Errorf("%s: method %d, want deflate", name, f.Method)
		}
		if f.Mode() != 0o644 || !f.Mode().IsRegular() {
			t.Errorf("%s: mode %v, want a regular file with 0644", name, f.Mode())
		}
		if strings.HasPrefix(name, "/") || strings.Contains(name, "..") || strings.Contains(name, `\`) {
			t.Errorf("%s: unsafe name", name)
		}
	}
	if got := readEntry(t, entries["data.txt"]); got != "linked content" {
		t.Errorf("a symlinked file is stored with its target's content; got %q", got)
	}
	if got := readEntry(t, entries["model.py"]); !strings.Contains(got, "def predict") {
		t.Errorf("model.py content = %q", got)
	}
}

func TestZipDirectoryIsDeterministic(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "b.py"), "B = 2\n")
	write(t, filepath.Join(dir, "a.py"), "A = 1\n")
	var first, second bytes.Buffer
	if _, err := ZipDirectory(dir, &first); err != nil {
		t.Fatal(err)
	}
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(filepath.Join(dir, "a.py"), later, later); err != nil {
		t.Fatal(err)
	}
	if _, err := ZipDirectory(dir, &second); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first.Bytes(), second.Bytes()) {
		t.Fatal("same files gave different zips: the sha256 would change")
	}
	for _, f := range zipEntries(t, first.Bytes()) {
		if !f.Modified.Equal(fixedTime) {
			t.Errorf("%s: time %v, want %v", f.Name, f.Modified, fixedTime)
		}
	}
}

func TestZipDirectoryRefusesEmptyAndMissingFolders(t *testing.T) {
	empty := t.TempDir()
	write(t, filepath.Join(empty, "__pycache__", "x.pyc"), "")
	if _, err := ZipDirectory(empty, io.Discard); err == nil || !strings.Contains(err.Error(), "no files") {
		t.Errorf("empty folder: err = %v", err)
	}
	if _, err := ZipDirectory(filepath.Join(empty, "nope"), io.Discard); err == nil {
		t.Error("missing folder: no error")
	}
	file := filepath.Join(empty, "file.py")
	write(t, file, "")
	if _, err := ZipDirectory(file, io.Discard); err == nil || !strings.Contains(err.Error(), "not a folder") {
		t.Errorf("a file: err = %v", err)
	}
}

func TestZipDirectoryOfTheIrisExample(t *testing.T) {
	iris := filepath.Join("..", "..", "..", "..", "..", "examples", "iris-v1")
	if _, err := os.Stat(filepath.Join(iris, "model.py")); err != nil {
		t.Skipf("examples/iris-v1 not found from here: %v", err)
	}
	var buf bytes.Buffer
	names, err := ZipDirectory(iris, &buf)
	if err != nil {
		t.Fatal(err)
	}
	entries := zipEntries(t, buf.Bytes())
	if _, ok := entries["model.py"]; !ok {
		t.Fatalf("model.py not at the zip's root: %q", names)
	}
	for _, name := range names {
		if strings.Contains(name, "__pycache__") || strings.HasSuffix(name, ".pyc") {
			t.Errorf("cache stored: %s", name)
		}
	}
}

// ---- errors ---------------------------------------------------------------------------

func badRequest(t *testing.T) *status.Status {
	t.Helper()
	s, err := status.New(codes.InvalidArgument, "model_id: must be 1-63 lowercase letters").WithDetails(
		&errdetails.ErrorInfo{
			Reason:   "INVALID_FIELD",
			Domain:   "modellifecycle.v1",
			Metadata: map[string]string{"field": "model_id"},
		},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "model_id", Description: "must be 1-63 lowercase letters"},
			{Field: "parent", Description: "must be projects/{project}"},
		}},
	)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func checkBadRequest(t *testing.T, err error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("errors.As(%T) to *Error failed", err)
	}
	if e.Code != codes.InvalidArgument || e.CodeName() != "INVALID_ARGUMENT" {
		t.Errorf("code = %v (%s)", e.Code, e.CodeName())
	}
	if e.Message != "model_id: must be 1-63 lowercase letters" {
		t.Errorf("message = %q", e.Message)
	}
	if e.Reason != "INVALID_FIELD" || e.Domain != "modellifecycle.v1" {
		t.Errorf("reason, domain = %q, %q", e.Reason, e.Domain)
	}
	if !reflect.DeepEqual(e.Metadata, map[string]string{"field": "model_id"}) {
		t.Errorf("metadata = %v", e.Metadata)
	}
	want := []FieldViolation{
		{"model_id", "must be 1-63 lowercase letters"},
		{"parent", "must be projects/{project}"},
	}
	if !reflect.DeepEqual(e.Violations, want) {
		t.Errorf("violations = %v", e.Violations)
	}
	if got := FormatViolations(e.Violations); got != "[model_id: must be 1-63 lowercase letters; parent: must be projects/{project}]" {
		t.Errorf("FormatViolations = %q", got)
	}
	if got := e.Error(); got != "INVALID_ARGUMENT: model_id: must be 1-63 lowercase letters [INVALID_FIELD]" {
		t.Errorf("Error() = %q", got)
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("status.Code(err) = %v: GRPCStatus is lost", status.Code(err))
	}
	if len(e.GRPCStatus().Details()) != 2 {
		t.Errorf("the status keeps its details: %v", e.GRPCStatus().Details())
	}
}

func TestErrorFromStatusWithDetails(t *testing.T) {
	checkBadRequest(t, FromError(badRequest(t).Err()))
	checkBadRequest(t, FromStatus(badRequest(t)))
}

// wrapped is an error that wraps another, as fmt.Errorf("...: %w") does.
type wrapped struct{ inner error }

func (w wrapped) Error() string { return "while testing: " + w.inner.Error() }
func (w wrapped) Unwrap() error { return w.inner }

func TestFromErrorKeepsOtherErrorsAndFindsWrappedOnes(t *testing.T) {
	plain := errors.New("not from gRPC")
	if FromError(plain) != plain {
		t.Error("an error without a gRPC status is returned as is")
	}
	if FromError(nil) != nil {
		t.Error("nil stays nil")
	}
	e := FromError(badRequest(t).Err())
	if FromError(e) != e {
		t.Error("an *Error is returned as is")
	}
	var target *Error
	if !errors.As(wrapped{e}, &target) || target.Reason != "INVALID_FIELD" {
		t.Error("errors.As finds a wrapped *Error")
	}
	if w := (wrapped{e}); FromError(w) != error(w) {
		t.Error("a wrapped *Error keeps its wrapping")
	}
}

func TestErrorWithoutDetails(t *testing.T) {
	err := FromError(status.Error(codes.NotFound, "model 'x' not found"))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%T", err)
	}
	if e.CodeName() != "NOT_FOUND" || e.Reason != "" || e.Metadata != nil || e.Violations != nil {
		t.Errorf("%+v", e)
	}
	if e.Error() != "NOT_FOUND: model 'x' not found" {
		t.Errorf("Error() = %q", e.Error())
	}
}

func TestErrorIsContextErrors(t *testing.T) {
	if !errors.Is(FromError(status.Error(codes.Canceled, "gone")), context.Canceled) {
		t.Error("CANCELLED is context.Canceled")
	}
	if !errors.Is(FromError(status.Error(codes.DeadlineExceeded, "late")), context.DeadlineExceeded) {
		t.Error("DEADLINE_EXCEEDED is context.DeadlineExceeded")
	}
	if errors.Is(FromError(status.Error(codes.NotFound, "x")), context.Canceled) {
		t.Error("NOT_FOUND is not context.Canceled")
	}
}

func TestCodeNames(t *testing.T) {
	for c, want := range map[codes.Code]string{
		codes.OK: "OK", codes.Canceled: "CANCELLED", codes.FailedPrecondition: "FAILED_PRECONDITION",
		codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE", codes.Code(99): "CODE(99)",
	} {
		if got := CodeName(c); got != want {
			t.Errorf("CodeName(%v) = %q, want %q", c, got, want)
		}
	}
}

func TestOperationError(t *testing.T) {
	if OperationError(&Operation{Done: true}) != nil {
		t.Error("a successful operation has no error")
	}
	if OperationError(nil) != nil {
		t.Error("nil operation")
	}
	op := &Operation{Name: "operations/1", Done: true, Error: badRequest(t).Proto()}
	checkBadRequest(t, OperationError(op))
}

// ---- against an in-process server -----------------------------------------------------

// fakeServer is just enough of the service to check the client's streaming, waiting
// and error decoding over a real gRPC connection.
type fakeServer struct {
	pb.UnimplementedModelLifecycleServer

	mu        sync.Mutex
	uploads   []*pb.UploadSourceRequest
	polls     int
	progress  []string
	failWith  *status.Status
	opFailure *status.Status
}

func (s *fakeServer) CreateModel(_ context.Context, req *pb.CreateModelRequest) (*pb.Model, error) {
	if s.failWith != nil {
		return nil, s.failWith.Err()
	}
	return &pb.Model{Name: req.GetParent() + "/models/" + req.GetModelId(), State: pb.ModelState_MODEL_STATE_NOT_DEPLOYED}, nil
}

func (s *fakeServer) UploadSource(stream pb.ModelLifecycle_UploadSourceServer) error {
	var size int64
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&pb.Source{Sha256: "abc", SizeBytes: size})
		}
		if err != nil {
			return err
		}
		s.mu.Lock()
		s.uploads = append(s.uploads, msg)
		s.mu.Unlock()
		size += int64(len(msg.GetChunk()))
	}
}

func (s *fakeServer) operation() *pb.Operation {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := s.polls
	s.polls++
	op := &pb.Operation{Name: "operations/1", Kind: pb.OperationKind_OPERATION_KIND_CREATE_BUILD}
	if i < len(s.progress) {
		op.Progress = s.progress[i]
	} else {
		op.Progress, op.Done = s.progress[len(s.progress)-1], true
		if s.opFailure != nil {
			op.Error = s.opFailure.Proto()
		}
	}
	return op
}

func (s *fakeServer) GetOperation(context.Context, *pb.GetOperationRequest) (*pb.Operation, error) {
	return s.operation(), nil
}

func (s *fakeServer) WaitOperation(_ context.Context, req *pb.WaitOperationRequest) (*pb.Operation, error) {
	if req.GetTimeout().AsDuration() <= 0 {
		return nil, status.Error(codes.InvalidArgument, "timeout")
	}
	return s.operation(), nil
}

func (s *fakeServer) WatchModel(req *pb.WatchModelRequest, stream pb.ModelLifecycle_WatchModelServer) error {
	for i, state := range []pb.ModelState{pb.ModelState_MODEL_STATE_NOT_DEPLOYED, pb.ModelState_MODEL_STATE_DEPLOYING} {
		ev := &pb.ModelEvent{
			Revision: req.GetSinceRevision() + int64(i) + 1,
			Type:     pb.EventType_EVENT_TYPE_UPDATED,
			Resource: &pb.ModelEvent_Model{Model: &pb.Model{Name: req.GetName(), State: state}},
		}
		if err := stream.Send(ev); err != nil {
			return err
		}
	}
	<-stream.Context().Done()
	return stream.Context().Err()
}

func startFake(t *testing.T, fake *fakeServer) *Client {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	pb.RegisterModelLifecycleServer(srv, fake)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	dialer := grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return lis.Dial() })
	c, err := Dial("bufnet", dialer)
	if err != nil {
		t.Fatal(err)
	}
	c.ProgressEvery = 10 * time.Millisecond
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestUploadZipStreamsChunksWithTheParentFirst(t *testing.T) {
	fake := &fakeServer{}
	c := startFake(t, fake)
	data := bytes.Repeat([]byte("0123456789abcdef"), (2*ChunkSize+100)/16+1)
	source, err := c.UploadZip(context.Background(), "projects/p/models/m", bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if source.GetSha256() != "abc" || source.GetSizeBytes() != int64(len(data)) {
		t.Fatalf("source = %v", source)
	}
	if len(fake.uploads) != 3 {
		t.Fatalf("%d messages, want 3 chunks", len(fake.uploads))
	}
	var joined []byte
	for i, msg := range fake.uploads {
		if (i == 0) != (msg.GetParent() == "projects/p/models/m") {
			t.Errorf("message %d: parent %q (only the first names the model)", i, msg.GetParent())
		}
		if len(msg.GetChunk()) > ChunkSize {
			t.Errorf("message %d: %d bytes", i, len(msg.GetChunk()))
		}
		joined = append(joined, msg.GetChunk()...)
	}
	if !bytes.Equal(joined, data) {
		t.Error("the chunks do not add up to the zip")
	}
	if _, err := c.UploadZip(context.Background(), "", bytes.NewReader(data)); err == nil {
		t.Error("no model name: error expected")
	}
}

func TestUploadSourceSendsAZipOfTheFolder(t *testing.T) {
	fake := &fakeServer{}
	c := startFake(t, fake)
	dir := t.TempDir()
	write(t, filepath.Join(dir, "model.py"), "def predict(body):\n    return 1\n")
	if _, err := c.UploadSource(context.Background(), "projects/p/models/m", dir); err != nil {
		t.Fatal(err)
	}
	var joined []byte
	for _, msg := range fake.uploads {
		joined = append(joined, msg.GetChunk()...)
	}
	if _, ok := zipEntries(t, joined)["model.py"]; !ok {
		t.Error("model.py not in the uploaded zip")
	}
}

func TestWaitReportsEachProgressOnceAndReturnsTheDoneOperation(t *testing.T) {
	fake := &fakeServer{progress: []string{"queued", "building", "building", "deploying", "deployed"}}
	c := startFake(t, fake)
	var seen []string
	op, err := c.Wait(context.Background(), "operations/1", func(op *Operation) {
		seen = append(seen, op.GetProgress()+map[bool]string{true: " (done)"}[op.GetDone()])
	})
	if err != nil {
		t.Fatal(err)
	}
	if !op.GetDone() {
		t.Fatal("Wait returned before done")
	}
	want := []string{"queued", "building", "deploying", "deployed", "deployed (done)"}
	if !reflect.DeepEqual(seen, want) {
		t.Errorf("progress = %q, want %q", seen, want)
	}
}

func TestWaitReturnsTheOperationsError(t *testing.T) {
	failed := status.New(codes.FailedPrecondition, "build failed")
	failed, _ = failed.WithDetails(&errdetails.ErrorInfo{Reason: "BUILD_FAILED", Domain: "modellifecycle.v1"})
	c := startFake(t, &fakeServer{progress: []string{"building"}, opFailure: failed})
	op, err := c.Wait(context.Background(), "operations/1", nil)
	var e *Error
	if !errors.As(err, &e) || e.Code != codes.FailedPrecondition || e.Reason != "BUILD_FAILED" {
		t.Fatalf("err = %v", err)
	}
	if op == nil || !op.GetDone() {
		t.Error("the failed operation is returned too")
	}
}

func TestErrorsOverTheWireKeepTheirDetails(t *testing.T) {
	c := startFake(t, &fakeServer{failWith: badRequest(t)})
	_, err := c.CreateModel(context.Background(), "projects/p", "Not Valid", nil)
	checkBadRequest(t, err)
	c2 := startFake(t, &fakeServer{})
	m, err := c2.CreateModel(context.Background(), "projects/p", "ok", nil)
	if err != nil || m.GetName() != "projects/p/models/ok" {
		t.Fatalf("%v %v", m, err)
	}
	_, err = c2.GetModel(context.Background(), "projects/p/models/ok")
	if e := (*Error)(nil); !errors.As(err, &e) || e.CodeName() != "UNIMPLEMENTED" {
		t.Errorf("err = %v", err)
	}
}

func TestWatchModelReceivesEventsUntilClosed(t *testing.T) {
	c := startFake(t, &fakeServer{})
	w, err := c.WatchModel(context.Background(), "projects/p/models/m", 10)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []pb.ModelState{pb.ModelState_MODEL_STATE_NOT_DEPLOYED, pb.ModelState_MODEL_STATE_DEPLOYING} {
		ev, err := w.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.GetRevision() != int64(11+i) || ev.GetModel().GetState() != want {
			t.Errorf("event %d = %v", i, ev)
		}
	}
	w.Close()
	_, err = w.Recv()
	if !errors.Is(err, context.Canceled) {
		t.Errorf("after Close: %v", err)
	}
}
