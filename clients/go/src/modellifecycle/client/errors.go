package client

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a failed call, or a failed operation, as the server described it: the
// canonical gRPC code, the message, the google.rpc.ErrorInfo detail (Reason, Domain,
// Metadata) and any google.rpc.BadRequest field violations.
//
// Every method of Client returns *Error for errors that come from the server:
//
//	var e *client.Error
//	if errors.As(err, &e) && e.Reason == "MODEL_NOT_FOUND" { ... }
type Error struct {
	Code    codes.Code
	Message string
	// From ErrorInfo: UPPER_SNAKE_CASE, e.g. "INVALID_FIELD", "MODEL_NOT_FOUND".
	Reason string
	// From ErrorInfo: "modellifecycle.v1" for the control plane's own errors.
	Domain string
	// From ErrorInfo, e.g. {"field": "model_id"} or {"name": "projects/p/models/m"}.
	Metadata map[string]string
	// From BadRequest: the fields that were wrong, in the server's order.
	Violations []FieldViolation

	status *status.Status
}

// FieldViolation is one entry of a google.rpc.BadRequest detail.
type FieldViolation struct {
	Field       string
	Description string
}

func (v FieldViolation) String() string { return v.Field + ": " + v.Description }

// CodeName is the canonical name of the code, as in the contract and other
// languages' clients: "INVALID_ARGUMENT", "NOT_FOUND", ...
func (e *Error) CodeName() string { return CodeName(e.Code) }

func (e *Error) Error() string {
	text := e.CodeName() + ": " + e.Message
	if e.Reason != "" {
		text += " [" + e.Reason + "]"
	}
	return text
}

// GRPCStatus keeps status.Code(err), status.FromError(err) and friends working.
func (e *Error) GRPCStatus() *status.Status {
	if e.status != nil {
		return e.status
	}
	return status.New(e.Code, e.Message)
}

// Is lets errors.Is(err, context.Canceled) and errors.Is(err, context.DeadlineExceeded)
// hold for calls that ended that way.
func (e *Error) Is(target error) bool {
	switch target {
	case context.Canceled:
		return e.Code == codes.Canceled
	case context.DeadlineExceeded:
		return e.Code == codes.DeadlineExceeded
	}
	return false
}

// FromStatus decodes a gRPC status and its ErrorInfo and BadRequest details.
// Details of other types are left in the status (GRPCStatus().Details()).
func FromStatus(s *status.Status) *Error {
	e := &Error{Code: s.Code(), Message: s.Message(), status: s}
	for _, detail := range s.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			e.Reason, e.Domain = d.GetReason(), d.GetDomain()
			if len(d.GetMetadata()) > 0 {
				e.Metadata = make(map[string]string, len(d.GetMetadata()))
				for k, v := range d.GetMetadata() {
					e.Metadata[k] = v
				}
			}
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.Violations = append(e.Violations, FieldViolation{v.GetField(), v.GetDescription()})
			}
		}
	}
	return e
}

// FromError turns an error of a gRPC call into *Error; nil stays nil, and an error
// that carries no gRPC status (nor wraps one) is returned as it is.
func FromError(err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	if s, ok := status.FromError(err); ok {
		return FromStatus(s)
	}
	return err
}

// OperationError is the error a done Operation ended with, as *Error; nil when it
// succeeded (or is not done yet).
func OperationError(op *Operation) error {
	if op == nil || op.GetError() == nil || op.GetError().GetCode() == int32(codes.OK) {
		return nil
	}
	return FromStatus(status.FromProto(op.GetError()))
}

var codeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// CodeName is the canonical (google.rpc.Code) name of c, e.g. "INVALID_ARGUMENT".
func CodeName(c codes.Code) string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return fmt.Sprintf("CODE(%d)", uint32(c))
}

// FormatViolations renders field violations compactly: "[model_id: must be ...]".
func FormatViolations(vs []FieldViolation) string {
	parts := make([]string, len(vs))
	for i, v := range vs {
		parts[i] = v.String()
	}
	return "[" + strings.Join(parts, "; ") + "]"
}
