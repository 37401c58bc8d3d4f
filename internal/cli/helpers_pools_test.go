package cli

import (
	"bytes"
	"regexp"
	"sync"
)

func regexpMatch(pattern, s string) (bool, error) { return regexp.MatchString(pattern, s) }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }
