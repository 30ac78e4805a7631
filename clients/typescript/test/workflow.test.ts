/**
 * The client against a real `modelctl serve` on a real Ray cluster: the whole active-model
 * workflow of examples/python-client/workflow.py, errors, and watches.
 *
 * The tests of the suite run in order and share one model: create, upload and build with
 * 2 replicas, call the endpoint, scale to 3 in place, restart, stop.
 */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import {
  Client,
  ClientError,
  DeploymentState,
  EventType,
  ModelState,
  OperationKind,
  ReplicaState,
  BuildState,
  zipDirectory,
  type Deployment,
  type ModelEvent,
  type Operation,
} from "../src/index.js";
import { REPO_ROOT, ServerProcess } from "./server.js";

const PROJECT = "projects/default";
const IRIS = join(REPO_ROOT, "examples", "iris-v1");
const SETOSA = [5.1, 3.5, 1.4, 0.2];
const OP_TIMEOUT_MS = 150_000;

/** Reads `events` until `stop` holds for one (inclusive) or the stream ends; then leaves the loop. */
async function readUntil(
  events: AsyncIterable<ModelEvent>,
  stop: (e: ModelEvent) => boolean,
): Promise<ModelEvent[]> {
  const seen: ModelEvent[] = [];
  for await (const event of events) {
    seen.push(event);
    if (stop(event)) break;
  }
  return seen;
}

function modelState(e: ModelEvent): ModelState | undefined {
  return e.resource.case === "model" ? e.resource.value.state : undefined;
}

/** The model states the events carried, in order, as names (for readable failures). */
function modelStates(events: readonly ModelEvent[], type: EventType): string[] {
  return events
    .filter((e) => e.type === type && e.resource.case === "model")
    .map((e) => ModelState[modelState(e) ?? ModelState.UNSPECIFIED]);
}

function describeEvents(events: readonly ModelEvent[]): string {
  return events
    .map((e) => {
      const r = e.resource;
      const state = r.case === undefined ? "" : String((r.value as { state?: unknown }).state ?? "");
      return `${e.revision} ${EventType[e.type]} ${r.case ?? "-"} ${state}`;
    })
    .join("\n");
}

/** A watch's events as a user checks them: the snapshot first, then changes in revision order. */
function assertWellFormed(events: readonly ModelEvent[]): void {
  const text = describeEvents(events);
  assert.equal(events[0]?.type, EventType.CURRENT, `the snapshot comes first:\n${text}`);
  const firstChange = events.findIndex((e) => e.type !== EventType.CURRENT);
  assert.ok(firstChange > 0, `changes follow the snapshot:\n${text}`);
  assert.ok(
    events.slice(firstChange).every((e) => e.type !== EventType.CURRENT),
    `no CURRENT event after the first change:\n${text}`,
  );
  const changes = events.slice(firstChange).filter((e) => e.type !== EventType.BOOKMARK);
  for (let i = 1; i < changes.length; i++) {
    assert.ok(changes[i]!.revision > changes[i - 1]!.revision, `revisions increase:\n${text}`);
  }
}

async function eventually(check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`not after ${timeoutMs / 1000}s: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A replica as the contract tells them apart: its id and its process. */
interface ReplicaKey {
  id: string;
  pid: bigint;
}

/** The deployment's replicas as (id, pid) pairs, sorted by id; each has a real process. */
function replicaKeys(d: Deployment): ReplicaKey[] {
  const keys = d.replicas.map((r) => ({ id: r.id, pid: r.pid }));
  for (const k of keys) {
    assert.ok(k.id !== "" && k.pid > 0n, `a replica with an id and a pid: ${showKeys(keys)}`);
  }
  return keys.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

function showKeys(keys: readonly ReplicaKey[]): string {
  return keys.map((k) => `${k.id} (pid ${k.pid})`).join(", ");
}

describe("the TypeScript client against modelctl serve", () => {
  const server = new ServerProcess();
  let c: Client;
  const modelId = `iris-ts-${randomBytes(3).toString("hex")}`;
  const modelName = `${PROJECT}/models/${modelId}`;
  let buildName = "";
  let endpoint = "";
  let replicasBefore: ReplicaKey[] = [];
  let invocationKey = "";

  before(
    async () => {
      await server.start();
      c = new Client(server.grpcAddress, { token: server.adminToken });
    },
    { timeout: 150_000 },
  );

  after(
    async () => {
      c?.close();
      const started = server.grpcAddress !== "";
      const code = await server.stop();
      if (started) {
        assert.equal(code, 0, `modelctl serve exits 0 on SIGTERM\n${server.log()}`);
      }
    },
    { timeout: 120_000 },
  );

  test("without a token every call is UNAUTHENTICATED", async () => {
    const anonymous = new Client(server.grpcAddress);
    try {
      await assert.rejects(anonymous.listModels(PROJECT), (e: unknown) => {
        assert.ok(e instanceof ClientError, `a ClientError, got ${String(e)}`);
        assert.equal(e.code, "UNAUTHENTICATED");
        return true;
      });
    } finally {
      anonymous.close();
    }
  });

  test("a bad model id is INVALID_ARGUMENT with reason INVALID_ID and a field violation", async () => {
    await assert.rejects(c.createModel(PROJECT, "Not A Valid Id"), (e: unknown) => {
      assert.ok(e instanceof ClientError, `a ClientError, got ${String(e)}`);
      assert.equal(e.code, "INVALID_ARGUMENT");
      assert.equal(e.reason, "INVALID_ID");
      assert.equal(e.domain, "modellifecycle.v1");
      assert.equal(e.violations.length, 1, JSON.stringify(e.violations));
      assert.equal(e.violations[0]?.field, "model_id");
      assert.match(e.violations[0]?.description ?? "", /not a valid id/);
      return true;
    });
  });

  test("an unknown model is NOT_FOUND with reason MODEL_NOT_FOUND", async () => {
    const missing = `${PROJECT}/models/no-such-model-${randomBytes(3).toString("hex")}`;
    await assert.rejects(c.getModel(missing), (e: unknown) => {
      assert.ok(e instanceof ClientError, `a ClientError, got ${String(e)}`);
      assert.equal(e.code, "NOT_FOUND");
      assert.equal(e.reason, "MODEL_NOT_FOUND");
      assert.equal(e.metadata["name"], missing);
      assert.deepEqual(e.violations, []);
      return true;
    });
  });

  test("create, upload, build and deploy 2 replicas: progress is reported, a watch sees DEPLOYING then DEPLOYED", async () => {
    const model = await c.createModel(PROJECT, modelId, { displayName: "Iris from TypeScript" });
    assert.equal(model.name, modelName);
    assert.equal(model.state, ModelState.NOT_DEPLOYED);
    assert.equal(model.activeDeployment, "");

    // The watch starts before the change: its snapshot has arrived when the build starts.
    const events = c.watchModel(modelName, 0, { signal: AbortSignal.timeout(OP_TIMEOUT_MS) });
    const first = await events.next();
    assert.ok(!first.done, "the watch yields the current state");
    assert.equal(first.value.type, EventType.CURRENT);
    assert.equal(modelState(first.value), ModelState.NOT_DEPLOYED);
    const watched = readUntil(events, (e) => modelState(e) === ModelState.DEPLOYED);

    const zip = zipDirectory(IRIS);
    const sent: number[] = [];
    const source = await c.uploadSource(modelName, zip, {
      chunkSize: 256,
      onProgress: (n, total) => {
        assert.equal(total, zip.length);
        sent.push(n);
      },
    });
    assert.equal(source.sha256, createHash("sha256").update(zip).digest("hex"));
    assert.equal(source.sizeBytes, BigInt(zip.length));
    assert.equal(sent.length, Math.ceil(zip.length / 256), "streamed in 256-byte chunks");
    assert.equal(sent.at(-1), zip.length);

    const op = await c.createBuild(modelName, source.sha256, "model.py", "predict", {
      comment: "from the TypeScript client",
      deploy: { resources: { replicas: 2 } },
    });
    assert.match(op.name, /^operations\/.+/);
    assert.equal(op.kind, OperationKind.CREATE_BUILD);
    assert.equal(op.done, false);

    const progress: Operation[] = [];
    const done = await c.wait(op.name, {
      timeoutMs: OP_TIMEOUT_MS,
      onProgress: (o) => progress.push(o),
    });
    const texts = progress.map((o) => `${o.progress}${o.done ? " (done)" : ""}`);
    assert.equal(done.done, true);
    assert.equal(done.error, undefined);
    assert.equal(progress[0]?.done, false, texts.join(" | "));
    assert.equal(progress.at(-1)?.done, true, texts.join(" | "));
    assert.ok(new Set(progress.map((o) => o.progress)).size >= 2, `progress moved: ${texts.join(" | ")}`);
    assert.ok(progress.every((o) => o.progress !== ""), `each report says something: ${texts.join(" | ")}`);

    const seen = [first.value, ...(await watched)];
    assertWellFormed(seen);
    const updates = modelStates(seen, EventType.UPDATED);
    const deploying = updates.indexOf("DEPLOYING");
    assert.ok(deploying >= 0, `an UPDATED event with DEPLOYING: ${updates.join(", ")}`);
    assert.ok(updates.indexOf("DEPLOYED", deploying) > deploying, `then DEPLOYED: ${updates.join(", ")}`);
    assert.equal((await events.next()).done, true, "the watch is over once the loop broke");

    buildName = done.target;
    const build = await c.getBuild(buildName);
    assert.equal(build.name, `${modelName}/builds/1`);
    assert.equal(build.state, BuildState.BUILT);
    assert.equal(build.sourceSha256, source.sha256);
    assert.equal(build.functionName, "predict");

    const deployed = await c.getModel(modelName);
    assert.equal(deployed.state, ModelState.DEPLOYED);
    assert.match(deployed.endpoint, /^http:\/\/.+\/default\/iris-ts-/);
    endpoint = deployed.endpoint;
    const deployment = await c.getDeployment(deployed.activeDeployment);
    assert.equal(deployment.build, buildName);
    assert.equal(deployment.state, DeploymentState.DEPLOYED);
    assert.equal(deployment.resources?.replicas, 2);
    assert.equal(deployment.replicas.length, 2);
    assert.ok(deployment.replicas.every((r) => r.state === ReplicaState.RUNNING));
    replicasBefore = replicaKeys(deployment);
  });

  test("the endpoint answers a POST with an invocation key, and 401 without", async () => {
    assert.ok(endpoint, "deployed by the previous test");
    const post = (key: string): Promise<Response> =>
      fetch(endpoint, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          ...(key ? { authorization: `Bearer ${key}` } : {}),
        },
        body: JSON.stringify({ features: [SETOSA] }),
        signal: AbortSignal.timeout(30_000),
      });
    assert.equal((await post("")).status, 401, "no key: refused by the replica");
    const { key, secret } = await c.createInvocationKey(modelName, "ts test");
    assert.ok(key?.name.startsWith(`${modelName}/keys/`), key?.name);
    invocationKey = secret;
    let answer = await post(secret);
    for (let i = 0; answer.status === 401 && i < 100; i++) {
      await new Promise((r) => setTimeout(r, 100)); // the replicas take the key within seconds
      answer = await post(secret);
    }
    const text = await answer.text();
    assert.equal(answer.status, 200, text);
    const body = JSON.parse(text) as {
      success?: boolean;
      response?: unknown;
      replica_id?: string;
      build?: string;
    };
    assert.equal(body.success, true, text);
    assert.deepEqual(body.response, { classes: ["setosa"], version: 1 });
    assert.equal(body.build, buildName);
    assert.ok(
      replicasBefore.some((r) => r.id === body.replica_id),
      `served by a replica (${showKeys(replicasBefore)}): ${text}`,
    );
  });

  test("scaling to 3 replicas with the same build is in place", async () => {
    const op = await c.createDeployment(modelName, buildName, { resources: { replicas: 3 } });
    assert.equal(op.kind, OperationKind.CREATE_DEPLOYMENT);
    await c.wait(op.name, { timeoutMs: OP_TIMEOUT_MS });

    const model = await c.getModel(modelName);
    assert.equal(model.state, ModelState.DEPLOYED);
    const deployment = await c.getDeployment(model.activeDeployment);
    assert.equal(deployment.build, buildName);
    assert.equal(deployment.state, DeploymentState.DEPLOYED);
    assert.equal(deployment.resources?.replicas, 3);
    assert.equal(deployment.replicas.length, 3);
    assert.ok(deployment.replicas.every((r) => r.state === ReplicaState.RUNNING));
    // In place: each of the 2 replicas is still there, same id AND same process.
    const after = replicaKeys(deployment);
    for (const kept of replicasBefore) {
      assert.ok(
        after.some((r) => r.id === kept.id && r.pid === kept.pid),
        `replica ${kept.id} (pid ${kept.pid}) kept its id and pid (in place): ` +
          `before ${showKeys(replicasBefore)}, after ${showKeys(after)}`,
      );
    }
    replicasBefore = after;
  });

  test("restart replaces every replica, same build and resources", async () => {
    const op = await c.restartModel(modelName);
    assert.equal(op.kind, OperationKind.RESTART_MODEL);
    await c.wait(op.name, { timeoutMs: OP_TIMEOUT_MS });

    const model = await c.getModel(modelName);
    assert.equal(model.state, ModelState.DEPLOYED);
    const deployment = await c.getDeployment(model.activeDeployment);
    assert.equal(deployment.build, buildName);
    assert.equal(deployment.resources?.replicas, 3);
    assert.equal(deployment.replicas.length, 3);
    // Every replica is new: no id and no pid of before is left.
    const after = replicaKeys(deployment);
    const seen = `before ${showKeys(replicasBefore)}, after ${showKeys(after)}`;
    assert.deepEqual(
      after.filter((r) => replicasBefore.some((b) => b.id === r.id)).map((r) => r.id),
      [],
      `every replica has a new id: ${seen}`,
    );
    assert.deepEqual(
      after.filter((r) => replicasBefore.some((b) => b.pid === r.pid)).map((r) => r.id),
      [],
      `every replica has a new pid: ${seen}`,
    );
  });

  test("stop: a watch started before sees STOPPING then STOPPED, and its stream closes on break", async () => {
    const events = c.watchModel(modelName, 0, { signal: AbortSignal.timeout(OP_TIMEOUT_MS) });
    const first = await events.next();
    assert.ok(!first.done, "the watch yields the current state");
    assert.equal(first.value.type, EventType.CURRENT);
    const watched = readUntil(events, (e) => modelState(e) === ModelState.STOPPED);

    const op = await c.stopModel(modelName);
    assert.equal(op.kind, OperationKind.STOP_MODEL);
    await c.wait(op.name, { timeoutMs: OP_TIMEOUT_MS });

    const seen = [first.value, ...(await watched)];
    assertWellFormed(seen);
    assert.deepEqual(
      modelStates(seen, EventType.CURRENT),
      ["DEPLOYED"],
      `the snapshot has the model DEPLOYED:\n${describeEvents(seen)}`,
    );
    const updates = modelStates(seen, EventType.UPDATED);
    const stopping = updates.indexOf("STOPPING");
    assert.ok(stopping >= 0, `an UPDATED event with STOPPING: ${updates.join(", ")}`);
    assert.ok(updates.indexOf("STOPPED", stopping) > stopping, `then STOPPED: ${updates.join(", ")}`);

    // Breaking out of the loop closed the gRPC stream: nothing is left open on the connection.
    assert.equal((await events.next()).done, true, "the watch is over once the loop broke");
    await eventually(() => c.connectionState() === "idle", "no stream left open on the connection");

    const model = await c.getModel(modelName);
    assert.equal(model.state, ModelState.STOPPED);
    assert.notEqual(model.activeDeployment, "", "a stopped model keeps its deployment");
    const answer = await fetch(endpoint, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${invocationKey}` },
      body: JSON.stringify({ features: [SETOSA] }),
      signal: AbortSignal.timeout(30_000),
    }).catch((e: unknown) => (e instanceof Error ? e : new Error(String(e))));
    assert.ok(
      answer instanceof Error || answer.status !== 200,
      "the endpoint of a stopped model does not answer 200",
    );
  });
});
