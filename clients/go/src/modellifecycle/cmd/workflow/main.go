// Command workflow runs the active-model workflow against a running `modelctl serve`
// with the Go client:
//
//	workflow -server 127.0.0.1:50051 -source examples/iris-v1
//
// It shows how a bad request comes back (code, ErrorInfo reason, field violations),
// creates a model, follows the model's events in the background, uploads and builds
// the source and deploys it with 2 replicas (progress printed as it goes), calls the
// endpoint with an invocation key, scales to 3 replicas in place (every replica keeps
// its id and process), restarts (every replica replaced), stops, checks that the watch
// saw the model go STOPPING then STOPPED and that the endpoint no longer answers the
// key. It exits non-zero at the first thing that does not go as expected.
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
	seen := newModelStates()
	var watching sync.WaitGroup
	watching.Add(1)
	go func() {
		defer watching.Done()
		defer seen.end()
		follow(watch, seen)
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
	endpoint := model.GetEndpoint()
	key, err := call(ctx, c, name, endpoint)
	if err != nil {
		return err
	}

	// Scale in place: the same build, only the replica count changes.
	before, err := replicas(ctx, c, name)
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
	after, err := replicas(ctx, c, name)
	if err != nil {
		return err
	}
	if model.GetState() != pb.ModelState_MODEL_STATE_DEPLOYED || len(after) != 3 {
		return fmt.Errorf("after scaling to 3: %s with %d replicas", modelState(model), len(after))
	}
	// In place: each replica that was there is still there, same id and same process.
	same := kept(before, after)
	printReplicas(before, after)
	fmt.Printf("  %d of %d replicas kept their id and pid\n", same, len(before))
	if same != len(before) {
		return fmt.Errorf("scaling with the same build replaced replicas: before %s, after %s", before, after)
	}
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
	restarted, err := replicas(ctx, c, name)
	if err != nil {
		return err
	}
	// Every replica replaced: none has an id or a pid from before.
	fresh := renewed(after, restarted)
	printReplicas(after, restarted)
	fmt.Printf("restarted: %s, %d of %d replicas new (new id and pid)\n", modelState(model), fresh, len(restarted))
	if model.GetState() != pb.ModelState_MODEL_STATE_DEPLOYED || len(restarted) != 3 || fresh != len(restarted) {
		return fmt.Errorf("after restart: %s, before %s, after %s", modelState(model), after, restarted)
	}

	mark := seen.mark() // the stop's events come after this
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

	// The watch follows the stop: STOPPING, then STOPPED (it may lag the operation a bit).
	select {
	case <-seen.stopped:
	case <-seen.ended:
	case <-time.After(30 * time.Second):
	case <-ctx.Done():
	}
	states := seen.since(mark)
	fmt.Printf("watch saw the stop: %s\n", strings.Join(states, " -> "))
	stopping := index(states, "STOPPING", 0)
	if stopping < 0 || index(states, "STOPPED", stopping+1) < 0 {
		return fmt.Errorf("the watch did not see STOPPING then STOPPED: %v", states)
	}

	return stoppedEndpoint(ctx, endpoint, key)
}

// stoppedEndpoint checks that a stopped model's endpoint no longer answers its (still
// valid) key: anything but 200 (Ray Serve answers 404 once the app is gone), or no
// answer at all. The proxy may take a moment to drop the route, so it asks a few times.
func stoppedEndpoint(ctx context.Context, endpoint, key string) error {
	status, answer := 0, ""
	for i := 0; i < 50; i++ {
		s, raw, err := post(ctx, endpoint, key)
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			fmt.Printf("after stop: POST %s with the key -> no answer (%v)\n", endpoint, err)
			return nil
		}
		status, answer = s, string(raw)
		if status != http.StatusOK {
			fmt.Printf("after stop: POST %s with the key -> %d\n", endpoint, status)
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("the endpoint of a stopped model still answers: POST %s -> %d %s", endpoint, status, answer)
}

// modelStates collects the model states of the watch's UPDATED Model events, in order.
type modelStates struct {
	mu      sync.Mutex
	states  []string
	stopped chan struct{} // closed at the first UPDATED Model STOPPED
	ended   chan struct{} // closed when the watch ends
}

func newModelStates() *modelStates {
	return &modelStates{stopped: make(chan struct{}), ended: make(chan struct{})}
}

func (m *modelStates) add(state string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.states = append(m.states, state)
	if state == "STOPPED" && !closed(m.stopped) {
		close(m.stopped)
	}
}

func (m *modelStates) end() { close(m.ended) }

// mark is how many states were seen so far, for since.
func (m *modelStates) mark() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.states)
}

// since is the states seen after mark.
func (m *modelStates) since(mark int) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.states[mark:]...)
}

func closed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// index is the position of s in list at or after from, -1 if absent.
func index(list []string, s string, from int) int {
	for i := from; i < len(list); i++ {
		if list[i] == s {
			return i
		}
	}
	return -1
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

// follow prints each event until the watch ends (Close, or the server goes), and
// records the model's state of each UPDATED Model event in seen.
func follow(w *client.Watch, seen *modelStates) {
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
		if kind == "Model" && ev.GetType() == pb.EventType_EVENT_TYPE_UPDATED {
			seen.add(state)
		}
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
// It returns the key's secret.
func call(ctx context.Context, c *client.Client, model, endpoint string) (string, error) {
	if endpoint == "" {
		return "", errors.New("the deployed model has no endpoint")
	}
	status, _, err := post(ctx, endpoint, "")
	if err != nil {
		return "", err
	}
	fmt.Printf("POST %s without a key -> %d\n", endpoint, status)
	key, err := c.CreateInvocationKey(ctx, model, "go example")
	if err != nil {
		return "", err
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
		return "", err
	}
	var answer struct {
		Response json.RawMessage `json:"response"`
	}
	if status != http.StatusOK || json.Unmarshal(raw, &answer) != nil || answer.Response == nil {
		return "", fmt.Errorf("POST %s -> %d %s", endpoint, status, raw)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, answer.Response); err != nil {
		return "", err
	}
	fmt.Printf("POST %s with the key -> %d %s\n", endpoint, status, compact.String())
	return key.GetSecret(), nil
}

// replica is what tells one replica process from another: its id and its pid.
type replica struct {
	id  string
	pid int64
}

func (r replica) String() string { return fmt.Sprintf("%s (pid %d)", r.id, r.pid) }

// replicas are the active deployment's replicas.
func replicas(ctx context.Context, c *client.Client, name string) ([]replica, error) {
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
	out := make([]replica, 0, len(d.GetReplicas()))
	for _, r := range d.GetReplicas() {
		if r.GetId() == "" || r.GetPid() <= 0 {
			return nil, fmt.Errorf("%s has a replica without an id or a pid: %v", d.GetName(), r)
		}
		out = append(out, replica{id: r.GetId(), pid: r.GetPid()})
	}
	return out, nil
}

// kept counts the replicas of before that are still in after: same id and same pid.
func kept(before, after []replica) int {
	now := make(map[replica]bool, len(after))
	for _, r := range after {
		now[r] = true
	}
	n := 0
	for _, r := range before {
		if now[r] {
			n++
		}
	}
	return n
}

// renewed counts the replicas of after that share neither their id nor their pid with
// one of before.
func renewed(before, after []replica) int {
	ids := make(map[string]bool, len(before))
	pids := make(map[int64]bool, len(before))
	for _, r := range before {
		ids[r.id], pids[r.pid] = true, true
	}
	n := 0
	for _, r := range after {
		if !ids[r.id] && !pids[r.pid] {
			n++
		}
	}
	return n
}

// printReplicas prints each replica of after as kept (the id and pid of one of before),
// new (neither an id nor a pid of before) or mixed (one of the two from before).
func printReplicas(before, after []replica) {
	was := make(map[replica]bool, len(before))
	ids := make(map[string]bool, len(before))
	pids := make(map[int64]bool, len(before))
	for _, r := range before {
		was[r], ids[r.id], pids[r.pid] = true, true, true
	}
	for _, r := range after {
		what := "new"
		switch {
		case was[r]:
			what = "kept"
		case ids[r.id]:
			what = "kept its id, new pid"
		case pids[r.pid]:
			what = "new id, kept its pid"
		}
		fmt.Printf("  replica %s: %s\n", r, what)
	}
}

func modelState(m *client.Model) string {
	return strings.TrimPrefix(m.GetState().String(), "MODEL_STATE_")
}
