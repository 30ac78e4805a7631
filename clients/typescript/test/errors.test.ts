/** ClientError from a ConnectError with google.rpc details (no server needed). */

import assert from "node:assert/strict";
import { test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";

import {
  BadRequestSchema,
  ClientError,
  ErrorInfoSchema,
  OperationError,
  OperationSchema,
  StatusSchema,
  codeName,
} from "../src/index.js";

test("a ConnectError's code, ErrorInfo and BadRequest become a ClientError", () => {
  const err = new ConnectError("model_id: not a valid id", Code.InvalidArgument, undefined, [
    {
      desc: ErrorInfoSchema,
      value: { reason: "INVALID_ID", domain: "modellifecycle.v1", metadata: { field: "model_id" } },
    },
    {
      desc: BadRequestSchema,
      value: { fieldViolations: [{ field: "model_id", description: "not a valid id" }] },
    },
  ]);
  const e = ClientError.from(err);
  assert.ok(e instanceof Error && e instanceof ClientError);
  assert.equal(e.code, "INVALID_ARGUMENT");
  assert.equal(e.reason, "INVALID_ID");
  assert.equal(e.domain, "modellifecycle.v1");
  assert.deepEqual(e.metadata, { field: "model_id" });
  assert.deepEqual(e.violations, [{ field: "model_id", description: "not a valid id" }]);
  assert.equal(e.rawMessage, "model_id: not a valid id");
  assert.equal(e.message, "INVALID_ARGUMENT: model_id: not a valid id [INVALID_ID]");
  assert.equal(e.cause, err);
});

test("code names are gRPC's, not Connect's", () => {
  assert.equal(codeName(Code.Canceled), "CANCELLED");
  assert.equal(codeName(Code.FailedPrecondition), "FAILED_PRECONDITION");
  assert.equal(codeName(99), "UNKNOWN");
  assert.equal(ClientError.from(new Error("boom")).code, "UNKNOWN");
});

test("a failed operation's google.rpc.Status becomes an OperationError", () => {
  const info = create(ErrorInfoSchema, { reason: "BUILD_FAILED", domain: "modellifecycle.v1" });
  const op = create(OperationSchema, {
    name: "operations/x",
    done: true,
    error: create(StatusSchema, {
      code: Code.FailedPrecondition,
      message: "no function predict",
      details: [anyPack(ErrorInfoSchema, info)],
    }),
  });
  assert.ok(op.error);
  const e = new OperationError(op, op.error);
  assert.ok(e instanceof ClientError);
  assert.equal(e.code, "FAILED_PRECONDITION");
  assert.equal(e.reason, "BUILD_FAILED");
  assert.equal(e.operation, op);
  assert.match(e.message, /operations\/x failed: no function predict/);
});
