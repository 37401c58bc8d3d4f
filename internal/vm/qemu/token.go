package qemu

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/metadata"
)

// Header names of MMDS V2 sessions (Firecracker's, and AWS's that clients
// written for EC2 send).
var (
	ttlHeaders   = []string{"X-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token-ttl-seconds"}
	tokenHeaders = []string{"X-metadata-token", "X-aws-ec2-metadata-token"}
)

// statelessV2 adds MMDS V2 session tokens in front of a handler. A token
// is its expiry and an HMAC of it under the VM's key: any process holding
// the key can check it, which per-connection metadata helpers need, and
// nothing has to be remembered between connections.
type statelessV2 struct {
	key  []byte
	next http.Handler
	now  func() time.Time
}

const macLen = 16

func (s *statelessV2) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodPut:
		if strings.TrimSuffix(r.URL.Path, "/") == metadata.TokenPath {
			s.issue(w, r)
			return
		}
	case http.MethodGet, http.MethodHead:
		if !s.valid(header(r, tokenHeaders)) {
			http.Error(w, "a valid session token is required: PUT "+metadata.TokenPath+" with "+ttlHeaders[0]+", then send it in "+tokenHeaders[0], http.StatusUnauthorized)
			return
		}
	}
	s.next.ServeHTTP(w, r)
}

func header(r *http.Request, names []string) string {
	for _, n := range names {
		if v := r.Header.Get(n); v != "" {
			return v
		}
	}
	return ""
}

func (s *statelessV2) issue(w http.ResponseWriter, r *http.Request) {
	// A request relayed by a proxy inside the guest must not get a token:
	// that is what keeps SSRF from reaching the metadata.
	if r.Header.Get("X-Forwarded-For") != "" {
		http.Error(w, "token requests must not carry X-Forwarded-For", http.StatusBadRequest)
		return
	}
	secs, err := strconv.Atoi(header(r, ttlHeaders))
	if err != nil || secs < 1 || time.Duration(secs)*time.Second > metadata.MaxTokenTTL {
		http.Error(w, fmt.Sprintf("%s must be a number of seconds from 1 to %d", ttlHeaders[0], int(metadata.MaxTokenTTL.Seconds())), http.StatusBadRequest)
		return
	}
	exp := s.now().Add(time.Duration(secs) * time.Second).Unix()
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprint(w, s.token(exp))
}

func (s *statelessV2) token(exp int64) string {
	b := binary.BigEndian.AppendUint64(nil, uint64(exp))
	m := hmac.New(sha256.New, s.key)
	m.Write(b)
	return base64.RawURLEncoding.EncodeToString(m.Sum(b)[:8+macLen])
}

func (s *statelessV2) valid(token string) bool {
	b, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil || len(b) != 8+macLen {
		return false
	}
	exp := int64(binary.BigEndian.Uint64(b[:8]))
	if !s.now().Before(time.Unix(exp, 0)) {
		return false
	}
	return hmac.Equal([]byte(s.token(exp)), []byte(token))
}
