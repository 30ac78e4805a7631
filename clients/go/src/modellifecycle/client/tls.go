package client

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// TLSConfig trusts the CA in caFile (PEM; empty: the system's roots) and, when certFile
// and keyFile are given, presents that client certificate (for mutual TLS).
func TLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("the CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("the CA file %s holds no PEM certificate", caFile)
		}
		config.RootCAs = pool
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("a client certificate needs its key, and a key its certificate")
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("the client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// DialTLS connects to addr over TLS (see TLSConfig); opts are added after, e.g.
// WithTokenTLS(token).
func DialTLS(addr, caFile, certFile, keyFile string, opts ...grpc.DialOption) (*Client, error) {
	config, err := TLSConfig(caFile, certFile, keyFile)
	if err != nil {
		return nil, err
	}
	creds := grpc.WithTransportCredentials(credentials.NewTLS(config))
	conn, err := grpc.Dial(addr, append([]grpc.DialOption{creds}, opts...)...)
	if err != nil {
		return nil, err
	}
	return New(conn), nil
}
