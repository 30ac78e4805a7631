/**
 * Errors from the control plane, as users check them: the gRPC code name
 * ("INVALID_ARGUMENT"), the google.rpc.ErrorInfo reason ("INVALID_ID"), domain and
 * metadata, and the google.rpc.BadRequest field violations.
 */

import { ConnectError } from "@connectrpc/connect";
import { anyUnpack } from "@bufbuild/protobuf/wkt";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  type BadRequest,
  type ErrorInfo,
} from "./gen/google/rpc/error_details_pb.js";
import type { Status } from "./gen/google/rpc/status_pb.js";
import type { Operation } from "./gen/modellifecycle/v1/resources_pb.js";

/** The canonical gRPC code names, by number (the numbers of google.rpc.Code and Connect's Code). */
export const CODE_NAMES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
] as const;

export type CodeName = (typeof CODE_NAMES)[number];

/** The gRPC code name of a numeric code ("UNKNOWN" for a number outside the table). */
export function codeName(code: number): CodeName {
  return CODE_NAMES[code] ?? "UNKNOWN";
}

export interface FieldViolation {
  field: string;
  description: string;
}

export interface ClientErrorInit {
  /** The gRPC code name, e.g. "NOT_FOUND". */
  code: CodeName;
  message: string;
  reason?: string;
  domain?: string;
  metadata?: Record<string, string>;
  violations?: FieldViolation[];
  cause?: unknown;
}

/** An RPC that failed: what the server said, ready to check in code. */
export class ClientError extends Error {
  override name = "ClientError";
  /** The gRPC code name, e.g. "INVALID_ARGUMENT", "NOT_FOUND", "ABORTED". */
  readonly code: CodeName;
  /** The google.rpc.ErrorInfo reason in UPPER_SNAKE_CASE, e.g. "INVALID_ID"; "" when none. */
  readonly reason: string;
  /** The ErrorInfo domain ("modellifecycle.v1" for the control plane's own errors). */
  readonly domain: string;
  /** The ErrorInfo metadata, e.g. {field: "model_id"} or {name: "projects/p/models/m"}. */
  readonly metadata: Readonly<Record<string, string>>;
  /** The google.rpc.BadRequest field violations, for INVALID_ARGUMENT. */
  readonly violations: readonly FieldViolation[];
  /** The server's message, without the code in front. */
  readonly rawMessage: string;

  constructor(init: ClientErrorInit) {
    const text = `${init.code}: ${init.message}`;
    super(init.reason ? `${text} [${init.reason}]` : text, { cause: init.cause });
    this.code = init.code;
    this.rawMessage = init.message;
    this.reason = init.reason ?? "";
    this.domain = init.domain ?? "";
    this.metadata = { ...(init.metadata ?? {}) };
    this.violations = [...(init.violations ?? [])];
  }

  /** A ClientError from anything an RPC threw (a ConnectError, a network error, ...). */
  static from(err: unknown): ClientError {
    if (err instanceof ClientError) {
      return err;
    }
    const e = ConnectError.from(err);
    return new ClientError({
      code: codeName(e.code),
      message: e.rawMessage,
      ...fromDetails(e.findDetails(ErrorInfoSchema), e.findDetails(BadRequestSchema)),
      cause: err,
    });
  }
}

/** An operation (build, deploy, stop, restart) that ended with an error. */
export class OperationError extends ClientError {
  override name = "OperationError";
  /** The operation as it ended (done, with `error` set). */
  readonly operation: Operation;

  constructor(operation: Operation, status: Status) {
    const infos: ErrorInfo[] = [];
    const bad: BadRequest[] = [];
    for (const detail of status.details) {
      const info = anyUnpack(detail, ErrorInfoSchema);
      if (info !== undefined) infos.push(info);
      const request = anyUnpack(detail, BadRequestSchema);
      if (request !== undefined) bad.push(request);
    }
    super({
      code: codeName(status.code),
      message: `${operation.name} failed: ${status.message}`,
      ...fromDetails(infos, bad),
    });
    this.operation = operation;
  }
}

/** wait() gave up: the operation was not done in time (it goes on on the server). */
export class WaitTimeoutError extends Error {
  override name = "WaitTimeoutError";
  constructor(
    /** The operation as last seen. */
    readonly operation: Operation,
    timeoutMs: number,
  ) {
    super(`${operation.name} is not done after ${timeoutMs / 1000}s (last progress: ${operation.progress || "none"})`);
  }
}

function fromDetails(
  infos: readonly ErrorInfo[],
  bad: readonly BadRequest[],
): Pick<ClientErrorInit, "reason" | "domain" | "metadata" | "violations"> {
  const info = infos[0];
  return {
    reason: info?.reason ?? "",
    domain: info?.domain ?? "",
    metadata: { ...(info?.metadata ?? {}) },
    violations: bad.flatMap((b) =>
      b.fieldViolations.map((v) => ({ field: v.field, description: v.description })),
    ),
  };
}
