/** @modellifecycle/client: the TypeScript client of the ModelLifecycle control plane. */

export * from "./client.js";
export * from "./errors.js";
export * from "./zip.js";
export * from "./gen/modellifecycle/v1/resources_pb.js";
export * from "./gen/modellifecycle/v1/service_pb.js";
export {
  BadRequestSchema,
  ErrorInfoSchema,
  type BadRequest,
  type BadRequest_FieldViolation,
  type ErrorInfo,
} from "./gen/google/rpc/error_details_pb.js";
export { StatusSchema, type Status } from "./gen/google/rpc/status_pb.js";
