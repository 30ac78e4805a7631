package client

import (
	"context"
	"os"
	"strings"

	"google.golang.org/grpc"
)

// bearer sends `authorization: Bearer <token>` with every call.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false only for WithToken's plaintext use (a local server):
// over a network, dial with TLS (WithTokenTLS) so the token is never sent in the clear.
func (b bearer) RequireTransportSecurity() bool { return b.secure }

// WithToken sends token with every call, on any connection (plaintext included).
func WithToken(token string) grpc.DialOption {
	return grpc.WithPerRPCCredentials(bearer{token: token})
}

// WithTokenTLS sends token with every call and refuses to send it without TLS.
func WithTokenTLS(token string) grpc.DialOption {
	return grpc.WithPerRPCCredentials(bearer{token: token, secure: true})
}

// ReadToken reads a token file, such as the admin.token `modelctl serve` writes in its
// data dir at its first start.
func ReadToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(data)), nil
}
