// Command pki writes the certificates and keys one loopback control plane needs into a
// directory: a CA, serving certificates for kube-apiserver and etcd, client certificates
// (etcd client, admin, kube-controller-manager, the pod-lifecycle stand-in) and the
// ServiceAccount token signing key pair. Everything is signed by the one CA; the files
// are PEM. It refuses to write into a directory that already holds a CA.
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

type leaf struct {
	name   string // file stem: <name>.crt, <name>.key
	cn     string
	orgs   []string
	server bool
	client bool
}

// The apiserver's serving certificate must also name the in-cluster service (and its
// first ClusterIP) so clients that address it that way verify it.
var apiserverHosts = []string{
	"127.0.0.1", "localhost", "10.0.0.1",
	"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
}

var leaves = []leaf{
	{name: "apiserver", cn: "kube-apiserver", server: true},
	{name: "etcd-server", cn: "etcd", server: true},
	{name: "etcd-client", cn: "kube-apiserver-etcd-client", client: true},
	{name: "admin", cn: "controlplane:admin", orgs: []string{"system:masters"}, client: true},
	{name: "kube-controller-manager", cn: "system:kube-controller-manager", client: true},
	{name: "pod-lifecycle", cn: "controlplane:pod-lifecycle", orgs: []string{"system:masters"}, client: true},
}

func main() {
	dir := flag.String("dir", "", "directory to write into (created if missing)")
	validFor := flag.Duration("valid-for", 7*24*time.Hour, "validity of every certificate")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "pki: -dir is required")
		os.Exit(2)
	}
	if err := run(*dir, *validFor); err != nil {
		fmt.Fprintln(os.Stderr, "pki:", err)
		os.Exit(1)
	}
}

func run(dir string, validFor time.Duration) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, "ca.crt")); err == nil {
		return fmt.Errorf("%s already holds a CA", dir)
	}
	// Backdated a little so a clock a few seconds behind still accepts them.
	notBefore := time.Now().Add(-time.Hour)
	notAfter := notBefore.Add(validFor + time.Hour)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "stslock-controlplane-ca"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writeCert(dir, "ca", caDER, caKey); err != nil {
		return err
	}

	for _, l := range leaves {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: l.cn, Organization: l.orgs},
			NotBefore:    notBefore,
			NotAfter:     notAfter,
			KeyUsage:     x509.KeyUsageDigitalSignature,
		}
		if l.server {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
			hosts := []string{"127.0.0.1", "localhost"}
			if l.name == "apiserver" {
				hosts = apiserverHosts
			}
			for _, h := range hosts {
				if ip := net.ParseIP(h); ip != nil {
					tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
				} else {
					tmpl.DNSNames = append(tmpl.DNSNames, h)
				}
			}
		}
		if l.client {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
		if err != nil {
			return fmt.Errorf("%s: %w", l.name, err)
		}
		if err := writeCert(dir, l.name, der, key); err != nil {
			return err
		}
	}

	// ServiceAccount tokens: RS256, the algorithm every token consumer accepts.
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, "sa.key"), saKey); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, "sa.pub"), "PUBLIC KEY", pub, 0o644)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func writeCert(dir, name string, der []byte, key crypto.Signer) error {
	if err := writePEM(filepath.Join(dir, name+".crt"), "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return writeKey(filepath.Join(dir, name+".key"), key)
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		return errors.Join(err, f.Close())
	}
	return f.Close()
}
