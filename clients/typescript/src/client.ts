/**
 * A thin typed client for modellifecycle.v1.ModelLifecycle over gRPC (HTTP/2), on
 * @connectrpc/connect. Requests take plain values; responses are the generated
 * messages (src/gen); every failure is a ClientError.
 *
 *     const token = readFileSync(".modelctl/admin.token", "utf8").trim();
 *     const c = new Client("127.0.0.1:50051", { token });
 *     const model = await c.createModel("projects/default", "iris");
 *     const source = await c.uploadSource(model.name, zipDirectory("examples/iris-v1"));
 *     const op = await c.createBuild(model.name, source.sha256, "model.py", "predict", {
 *       deploy: { resources: { replicas: 2 } },
 *     });
 *     await c.wait(op.name, { onProgress: (o) => console.log(o.progress) });
 *     c.close();
 */

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import { createClient, type Client as ConnectClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { ClientError, OperationError, WaitTimeoutError } from "./errors.js";
import {
  ResourcesSchema,
  type Build,
  type Deployment,
  type InvocationKey,
  type Model,
  type ModelEvent,
  type Operation,
  type Resources,
  type Source,
} from "./gen/modellifecycle/v1/resources_pb.js";
import {
  ModelLifecycle,
  type ListBuildsResponse,
  type ListDeploymentsResponse,
  type ListModelsResponse,
  type BuildLogLine,
  type CreateInvocationKeyResponse,
  type ListInvocationKeysResponse,
  type ListOperationsResponse,
  type UploadSourceRequestSchema,
} from "./gen/modellifecycle/v1/service_pb.js";

/** UploadSource's default chunk size. */
export const DEFAULT_CHUNK_BYTES = 256 * 1024;

export interface ClientOptions {
  /** Deadline of each unary call, in ms (default 30 s). */
  timeoutMs?: number;
  /** Deadline of a whole upload, in ms (default 5 min). */
  uploadTimeoutMs?: number;
  /** Sent as `authorization: Bearer <token>` on every call, when the server wants one. */
  token?: string;
  /**
   * TLS (the address becomes https://): the CA to trust, as PEM (read it with
   * readFileSync); without it, Node's own roots. `cert` and `key`: this client's
   * certificate and key (PEM), for servers that want mutual TLS.
   */
  tls?: { ca?: string | Buffer; cert?: string | Buffer; key?: string | Buffer };
}

/** Resources per replica; fields left out are 0 (replicas: the server's rules apply). */
export interface ResourcesInit {
  replicas?: number;
  cpus?: number;
  memoryMib?: number | bigint;
  gpus?: number;
}

/** Set on createBuild to deploy the build once built ("Deploy a New Build"). */
export interface DeployOptionsInit {
  resources?: ResourcesInit;
  environment?: Record<string, string>;
}

export interface CallOptions {
  /** Makes a repeated call return the first call's result (the work is done once). */
  requestId?: string;
}

export interface PageOptions {
  pageSize?: number;
  pageToken?: string;
}

export interface CreateModelOptions extends CallOptions {
  displayName?: string;
  description?: string;
}

export interface UploadOptions {
  /** Bytes per UploadSource message (default 256 KiB). */
  chunkSize?: number;
  /** Called after each chunk is handed to the stream. */
  onProgress?: (sentBytes: number, totalBytes: number) => void;
}

export interface CreateBuildOptions extends CallOptions {
  comment?: string;
  /** Deploy the build once it is BUILT; the operation is done when the deployment is. */
  deploy?: DeployOptionsInit;
  /** Build from scratch even when an earlier build had the same inputs. */
  noCache?: boolean;
}

export interface CreateDeploymentOptions extends CallOptions {
  /** Left out: the active deployment's resources. */
  resources?: ResourcesInit;
  environment?: Record<string, string>;
}

export interface WaitOptions {
  /** Give up (WaitTimeoutError) after this long; default 15 min. */
  timeoutMs?: number;
  /** Called with the operation whenever its progress text or done flag changes. */
  onProgress?: (operation: Operation) => void;
  /** How often progress is looked at, at most; default 500 ms. */
  progressEveryMs?: number;
  /** Stops waiting (the operation goes on on the server). */
  signal?: AbortSignal;
}

export interface StreamOptions {
  /** Ends the stream (the iterator finishes without an error). */
  signal?: AbortSignal;
}

/** What the client's HTTP/2 connection is doing: "open" while a call or stream runs. */
export type ConnectionState = ReturnType<Http2SessionManager["state"]>;

function toResources(init: ResourcesInit): Resources {
  return create(ResourcesSchema, {
    replicas: init.replicas ?? 0,
    cpus: init.cpus ?? 0,
    memoryMib: BigInt(init.memoryMib ?? 0),
    gpus: init.gpus ?? 0,
  });
}

function durationOf(ms: number) {
  const whole = Math.max(0, Math.round(ms));
  return create(DurationSchema, {
    seconds: BigInt(Math.floor(whole / 1000)),
    nanos: (whole % 1000) * 1_000_000,
  });
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

export class Client {
  /** The generated Connect client, for anything this wrapper does not cover. */
  readonly raw: ConnectClient<typeof ModelLifecycle>;
  readonly baseUrl: string;
  private readonly session: Http2SessionManager;
  private readonly timeoutMs: number;
  private readonly uploadTimeoutMs: number;

  /** `address`: "host:port" (plain HTTP/2) or a URL such as "https://cp.example.com". */
  constructor(address: string, options: ClientOptions = {}) {
    const scheme = options.tls ? "https" : "http";
    this.baseUrl = address.includes("://") ? address : `${scheme}://${address}`;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.uploadTimeoutMs = options.uploadTimeoutMs ?? 300_000;
    this.session = new Http2SessionManager(this.baseUrl, undefined, options.tls ?? {});
    const interceptors: Interceptor[] = [];
    const token = options.token;
    if (token) {
      interceptors.push((next) => (req) => {
        req.header.set("authorization", `Bearer ${token}`);
        return next(req);
      });
    }
    this.raw = createClient(
      ModelLifecycle,
      createGrpcTransport({ baseUrl: this.baseUrl, sessionManager: this.session, interceptors }),
    );
  }

  /** "open" while calls or streams run on the connection, "idle" when none does. */
  connectionState(): ConnectionState {
    return this.session.state();
  }

  /** Closes the connection and every call still running on it. */
  close(): void {
    this.session.abort();
  }

  private async call<T>(fn: (opts: { timeoutMs: number }) => Promise<T>): Promise<T> {
    try {
      return await fn({ timeoutMs: this.timeoutMs });
    } catch (e) {
      throw ClientError.from(e);
    }
  }

  // ---- models --------------------------------------------------------------------------

  /** A new model `{parent}/models/{modelId}`; `parent` is "projects/{project}". */
  createModel(parent: string, modelId: string, options: CreateModelOptions = {}): Promise<Model> {
    return this.call((o) =>
      this.raw.createModel(
        {
          parent,
          modelId,
          model: { displayName: options.displayName ?? "", description: options.description ?? "" },
          requestId: options.requestId ?? "",
        },
        o,
      ),
    );
  }

  getModel(name: string): Promise<Model> {
    return this.call((o) => this.raw.getModel({ name }, o));
  }

  listModels(parent: string, page: PageOptions = {}): Promise<ListModelsResponse> {
    return this.call((o) => this.raw.listModels({ parent, ...page }, o));
  }

  /** Refuses an active model (FAILED_PRECONDITION). */
  async deleteModel(name: string): Promise<void> {
    await this.call((o) => this.raw.deleteModel({ name }, o));
  }

  // ---- sources and builds ----------------------------------------------------------------

  /** Streams `zip` (see zipDirectory) to the model in chunks; returns its content address. */
  uploadSource(model: string, zip: Uint8Array, options: UploadOptions = {}): Promise<Source> {
    const size = Math.max(1, Math.floor(options.chunkSize ?? DEFAULT_CHUNK_BYTES));
    async function* chunks(): AsyncGenerator<MessageInitShape<typeof UploadSourceRequestSchema>> {
      for (let start = 0; start < Math.max(zip.length, 1); start += size) {
        const chunk = zip.subarray(start, start + size);
        yield { parent: start === 0 ? model : "", chunk };
        options.onProgress?.(Math.min(start + size, zip.length), zip.length);
      }
    }
    return this.call(() => this.raw.uploadSource(chunks(), { timeoutMs: this.uploadTimeoutMs }));
  }

  /** Builds an uploaded source; with `deploy`, deploys it once built. Returns the operation. */
  createBuild(
    model: string,
    sourceSha256: string,
    filePath: string,
    functionName: string,
    options: CreateBuildOptions = {},
  ): Promise<Operation> {
    const deploy = options.deploy;
    return this.call((o) =>
      this.raw.createBuild(
        {
          parent: model,
          sourceSha256,
          filePath,
          functionName,
          comment: options.comment ?? "",
          requestId: options.requestId ?? "",
          noCache: options.noCache ?? false,
          ...(deploy && {
            deploy: {
              ...(deploy.resources && { resources: toResources(deploy.resources) }),
              environment: { ...(deploy.environment ?? {}) },
            },
          }),
        },
        o,
      ),
    );
  }

  getBuild(name: string): Promise<Build> {
    return this.call((o) => this.raw.getBuild({ name }, o));
  }

  listBuilds(model: string, page: PageOptions = {}): Promise<ListBuildsResponse> {
    return this.call((o) => this.raw.listBuilds({ parent: model, ...page }, o));
  }

  /** A build's log lines so far; with `follow`, each new one until the build ends. */
  buildLogs(name: string, follow = false, options: StreamOptions = {}): AsyncGenerator<BuildLogLine> {
    return this.stream((signal) => this.raw.streamBuildLogs({ name, follow }, { signal }), options);
  }

  // ---- deployments -----------------------------------------------------------------------

  /**
   * Re-deploys `build` (a build name): new resources (same build: replicas only is in
   * place), or an older build (rollback). Returns the operation.
   */
  createDeployment(
    model: string,
    build: string,
    options: CreateDeploymentOptions = {},
  ): Promise<Operation> {
    return this.call((o) =>
      this.raw.createDeployment(
        {
          parent: model,
          build,
          environment: { ...(options.environment ?? {}) },
          requestId: options.requestId ?? "",
          ...(options.resources && { resources: toResources(options.resources) }),
        },
        o,
      ),
    );
  }

  getDeployment(name: string): Promise<Deployment> {
    return this.call((o) => this.raw.getDeployment({ name }, o));
  }

  /** Newest first. */
  listDeployments(model: string, page: PageOptions = {}): Promise<ListDeploymentsResponse> {
    return this.call((o) => this.raw.listDeployments({ parent: model, ...page }, o));
  }

  // ---- stop, restart ---------------------------------------------------------------------

  /** Stops every replica; the model ends STOPPED. */
  stopModel(name: string, options: CallOptions = {}): Promise<Operation> {
    return this.call((o) => this.raw.stopModel({ name, requestId: options.requestId ?? "" }, o));
  }

  /** Replaces every replica of the active deployment; a STOPPED model starts again. */
  restartModel(name: string, options: CallOptions = {}): Promise<Operation> {
    return this.call((o) => this.raw.restartModel({ name, requestId: options.requestId ?? "" }, o));
  }

  // ---- operations ------------------------------------------------------------------------

  getOperation(name: string): Promise<Operation> {
    return this.call((o) => this.raw.getOperation({ name }, o));
  }

  listOperations(model: string, page: PageOptions = {}): Promise<ListOperationsResponse> {
    return this.call((o) => this.raw.listOperations({ parent: model, ...page }, o));
  }

  /** Stops a running build or deploy; returns the operation, done with a CANCELLED error. */
  cancelOperation(name: string): Promise<Operation> {
    return this.call((o) => this.raw.cancelOperation({ name }, o));
  }

  /**
   * A new invocation key for `model`'s endpoint: `secret` is shown once, and goes in
   * `Authorization: Bearer <secret>` on requests to the endpoint. The replicas take a new
   * key (or a revocation) within seconds.
   */
  createInvocationKey(model: string, description = ""): Promise<CreateInvocationKeyResponse> {
    return this.call((o) => this.raw.createInvocationKey({ parent: model, description }, o));
  }

  listInvocationKeys(model: string, page: PageOptions = {}): Promise<ListInvocationKeysResponse> {
    return this.call((o) => this.raw.listInvocationKeys({ parent: model, ...page }, o));
  }

  revokeInvocationKey(name: string): Promise<InvocationKey> {
    return this.call((o) => this.raw.revokeInvocationKey({ name }, o));
  }

  /** One WaitOperation call: the operation once done, or as it is after `timeoutMs`. */
  waitOperation(name: string, timeoutMs: number, signal?: AbortSignal): Promise<Operation> {
    return this.call(() =>
      this.raw.waitOperation(
        { name, timeout: durationOf(timeoutMs) },
        { timeoutMs: timeoutMs + this.timeoutMs, ...(signal && { signal }) },
      ),
    );
  }

  /**
   * Follows an operation until it is done, calling `onProgress` whenever it changes;
   * returns it done. Throws OperationError if it ended with an error, WaitTimeoutError
   * if it is not done after `timeoutMs` (it goes on: look it up with getOperation).
   */
  async wait(name: string, options: WaitOptions = {}): Promise<Operation> {
    const timeoutMs = options.timeoutMs ?? 900_000;
    const every = options.progressEveryMs ?? 500;
    const deadline = Date.now() + timeoutMs;
    let last: string | undefined;
    let op = await this.getOperation(name);
    for (;;) {
      const seen = JSON.stringify([op.progress, op.done]);
      if (seen !== last) {
        options.onProgress?.(op);
      }
      last = seen;
      if (op.done) {
        if (op.error !== undefined) {
          throw new OperationError(op, op.error);
        }
        return op;
      }
      options.signal?.throwIfAborted();
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new WaitTimeoutError(op, timeoutMs);
      }
      const started = Date.now();
      op = await this.waitOperation(name, Math.min(every, left), options.signal);
      if (!op.done && Date.now() - started < Math.min(every, left) / 2) {
        await sleep(Math.min(every, left), options.signal); // a server that answers at once
      }
    }
  }

  // ---- watch -----------------------------------------------------------------------------

  /**
   * The model's events as an async iterable: with `sinceRevision` 0 the current state
   * first (type CURRENT), then every change (CREATED, UPDATED, DELETED) in order; above 0,
   * exactly the events after that revision. Runs until the caller stops iterating (break,
   * return, throw) or `signal` aborts; then the stream is closed.
   */
  watchModel(
    name: string,
    sinceRevision: bigint | number = 0n,
    options: StreamOptions = {},
  ): AsyncGenerator<ModelEvent> {
    return this.stream(
      (signal) =>
        this.raw.watchModel({ name, sinceRevision: BigInt(sinceRevision) }, { signal }),
      options,
    );
  }

  /**
   * Every model of a project (`parent`: "projects/{project}"), as watchModel does for one.
   * `filter`: e.g. "kind=model model=iris". BOOKMARK events carry the latest revision.
   */
  watchModels(
    parent: string,
    filter = "",
    sinceRevision: bigint | number = 0n,
    options: StreamOptions = {},
  ): AsyncGenerator<ModelEvent> {
    return this.stream(
      (signal) =>
        this.raw.watchModels({ parent, filter, sinceRevision: BigInt(sinceRevision) }, { signal }),
      options,
    );
  }

  /**
   * A server stream's messages; errors as ClientError; the call is cancelled when the
   * caller stops reading (the generator's finally) or `options.signal` aborts.
   */
  private async *stream<T>(
    open: (signal: AbortSignal) => AsyncIterable<T>,
    options: StreamOptions,
  ): AsyncGenerator<T> {
    const controller = new AbortController();
    const outer = options.signal;
    const stop = (): void => controller.abort();
    if (outer?.aborted) return;
    outer?.addEventListener("abort", stop, { once: true });
    const messages = open(controller.signal)[Symbol.asyncIterator]();
    try {
      for (;;) {
        let next: IteratorResult<T>;
        try {
          next = await messages.next();
        } catch (e) {
          if (controller.signal.aborted) return; // stopped on purpose
          throw ClientError.from(e);
        }
        if (next.done) return;
        yield next.value;
      }
    } finally {
      outer?.removeEventListener("abort", stop);
      // Cancel first: return() of a stream still waiting for data must not wait for it.
      controller.abort();
      await messages.return?.().catch(() => undefined);
    }
  }
}
