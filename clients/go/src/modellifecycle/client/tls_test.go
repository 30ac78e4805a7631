package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	pb "modellifecycle/v1"
)

// pki makes a CA, a server certificate for 127.0.0.1 and a client certificate, as PEM
// files in dir.
type pki struct{ dir string }

func writePEM(t *testing.T, path, kind string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func makePKI(t *testing.T) pki {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER)
	for i, name := range []string{"server", "client"} {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature,
		}
		if name == "server" {
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		} else {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caTmpl, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(dir, name+".crt"), "CERTIFICATE", der)
		keyDER, _ := x509.MarshalECPrivateKey(key)
		writePEM(t, filepath.Join(dir, name+".key"), "EC PRIVATE KEY", keyDER)
	}
	return pki{dir}
}

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

// tokenEcho answers GetModel with the bearer token it was sent as the model's name.
type tokenEcho struct {
	pb.UnimplementedModelLifecycleServer
}

func (tokenEcho) GetModel(ctx context.Context, _ *pb.GetModelRequest) (*pb.Model, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	return &pb.Model{Name: firstOf(md.Get("authorization"))}, nil
}

func firstOf(values []string) string {
	if len(values) == 0 {
		return ""
	}
	return values[0]
}

func startMutualTLS(t *testing.T, p pki) string {
	t.Helper()
	server, err := tls.LoadX509KeyPair(p.path("server.crt"), p.path("server.key"))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := TLSConfig(p.path("ca.pem"), "", "")
	if err != nil {
		t.Fatal(err)
	}
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{server},
		ClientCAs:    roots.RootCAs,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(creds))
	pb.RegisterModelLifecycleServer(srv, tokenEcho{})
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

func TestMutualTLSWithTheCAAndAClientCertificateSendsTheToken(t *testing.T) {
	p := makePKI(t)
	addr := startMutualTLS(t, p)
	c, err := DialTLS(addr, p.path("ca.pem"), p.path("client.crt"), p.path("client.key"), WithTokenTLS("secret"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := c.GetModel(ctx, "projects/p/models/m")
	if err != nil {
		t.Fatal(err)
	}
	if m.GetName() != "Bearer secret" {
		t.Errorf("the server saw authorization %q", m.GetName())
	}
}

func TestTLSHandshakesThatMustFail(t *testing.T) {
	p := makePKI(t)
	addr := startMutualTLS(t, p)
	for name, files := range map[string][3]string{
		"no client certificate": {p.path("ca.pem"), "", ""},
		"the system's roots":    {"", p.path("client.crt"), p.path("client.key")},
	} {
		c, err := DialTLS(addr, files[0], files[1], files[2])
		if err != nil {
			t.Fatal(name, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := c.GetModel(ctx, "projects/p/models/m"); err == nil {
			t.Errorf("%s: the call went through", name)
		}
		cancel()
		c.Close()
	}
	if _, err := TLSConfig(p.path("ca.pem"), p.path("client.crt"), ""); err == nil {
		t.Error("a certificate without its key must be refused")
	}
}
