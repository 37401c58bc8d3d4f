package guest

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"
)

// The console protocol. Host and init share the serial console with the
// kernel's printk and anything else that writes to the console, so a record
// is one line that cannot be produced without the per-VM key:
//
//	\x1eFA1 <type> <seq> <base64 payload> <mac>\n
//
// mac is hex(HMAC-SHA256(key, "FA1\x00" type "\x00" seq "\x00" payload))
// truncated to 16 bytes. seq starts at 1 and grows by one per frame in each
// direction; a reader accepts only a seq greater than the last one it
// accepted, so recorded frames cannot be replayed or reordered, while a
// frame mangled by an interleaved kernel message costs only that frame.
// Every line that is not a valid frame is noise, passed on as such.
const (
	frameMagic   = "\x1eFA1 "
	macBytes     = 16
	protoVersion = "FA1"
	// MaxPayload is the largest payload of one frame; FrameWriter.Stream
	// splits longer writes.
	MaxPayload = 4096
	// maxLine bounds a noise line; longer runs come out in pieces.
	maxLine = 64 << 10
)

var strictBase64 = base64.StdEncoding.Strict()

// FrameType names a record. Types are lower-case ASCII words.
type FrameType string

const (
	// FrameNoise is console output that is not a frame (kernel messages,
	// output of a system-mode image, forged or damaged frames). Its payload
	// is the line without the line ending.
	FrameNoise FrameType = "noise"

	// Guest to host.

	// FrameStdout and FrameStderr carry raw workload output.
	FrameStdout FrameType = "stdout"
	FrameStderr FrameType = "stderr"
	// FrameStarted (JSON Started) says the workload runs, or in system
	// mode that the init is about to exec /sbin/init.
	FrameStarted FrameType = "started"
	// FrameExit (JSON Exit) is the workload's exit status; the guest powers
	// off right after it.
	FrameExit FrameType = "exit"
	// FrameError is the text of an init failure; the guest powers off
	// right after it.
	FrameError FrameType = "error"
	// FrameLog is a progress message of the init (text).
	FrameLog FrameType = "log"

	// Host to guest.

	// FrameSignal (JSON SignalRequest) sends a signal to the workload.
	FrameSignal FrameType = "signal"
	// FrameStop (JSON StopRequest) asks for a graceful stop: the stop
	// signal, then SIGKILL after the grace period, then power off.
	FrameStop FrameType = "stop"
	// FrameExec is reserved for running extra processes in the guest.
	FrameExec FrameType = "exec"
)

// Frame is one record, or one line of noise.
type Frame struct {
	Type    FrameType
	Seq     uint64
	Payload []byte
}

// DecodeJSON decodes a JSON payload such as Exit or Started.
func (f Frame) DecodeJSON(v any) error {
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return fmt.Errorf("decode %s frame %d: %w", f.Type, f.Seq, err)
	}
	return nil
}

// Started is the payload of FrameStarted.
type Started struct {
	PID  int  `json:"pid"`
	Mode Mode `json:"mode"`
}

// Exit is the payload of FrameExit. Signal is non-zero when the workload
// was killed by a signal; Code is then 128+Signal, as a shell reports it.
type Exit struct {
	Code   int    `json:"code"`
	Signal int    `json:"signal,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// SignalRequest is the payload of FrameSignal.
type SignalRequest struct {
	Signal int `json:"signal"`
}

// StopRequest is the payload of FrameStop. Zero Grace means the Config's
// StopGrace.
type StopRequest struct {
	Grace time.Duration `json:"grace,omitempty"`
}

// NewConsoleKey returns a fresh random key for Config.ConsoleKey.
func NewConsoleKey() ([]byte, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("console key: %w", err)
	}
	return k, nil
}

func frameMAC(key []byte, t FrameType, seq string, payload []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(protoVersion))
	m.Write([]byte{0})
	m.Write([]byte(t))
	m.Write([]byte{0})
	m.Write([]byte(seq))
	m.Write([]byte{0})
	m.Write(payload)
	return m.Sum(nil)[:macBytes]
}

func validType(t FrameType) bool {
	if len(t) == 0 || len(t) > 16 || t == FrameNoise {
		return false
	}
	for i := 0; i < len(t); i++ {
		if t[i] < 'a' || t[i] > 'z' {
			return false
		}
	}
	return true
}

// FrameWriter writes authenticated frames. It is safe for concurrent use;
// each frame goes out in a single Write.
type FrameWriter struct {
	mu  sync.Mutex
	w   io.Writer
	key []byte
	seq uint64
	buf []byte
}

// NewWriter returns a FrameWriter that writes to w, authenticating frames
// with key.
func NewWriter(w io.Writer, key []byte) *FrameWriter {
	return &FrameWriter{w: w, key: bytes.Clone(key)}
}

// NewWriterAfter returns a FrameWriter whose first frame carries sequence
// number last+1. A host process that takes over a running VM's console
// (re-attach after a restart) continues the numbering its predecessor
// left, as the guest accepts only numbers above the last it saw; skipping
// numbers is fine, reusing one is not.
func NewWriterAfter(w io.Writer, key []byte, last uint64) *FrameWriter {
	fw := NewWriter(w, key)
	fw.seq = last
	return fw
}

// Last returns the sequence number of the last frame written (or given to
// NewWriterAfter).
func (fw *FrameWriter) Last() uint64 {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.seq
}

// WriteFrame writes one frame.
func (fw *FrameWriter) WriteFrame(t FrameType, payload []byte) error {
	if !validType(t) {
		return fmt.Errorf("write frame: invalid type %q", t)
	}
	if len(payload) > MaxPayload {
		return fmt.Errorf("write %s frame: payload of %d bytes exceeds %d", t, len(payload), MaxPayload)
	}
	fw.mu.Lock()
	defer fw.mu.Unlock()
	fw.seq++
	seq := strconv.FormatUint(fw.seq, 10)
	b := fw.buf[:0]
	b = append(b, frameMagic...)
	b = append(b, t...)
	b = append(b, ' ')
	b = append(b, seq...)
	b = append(b, ' ')
	b = base64.StdEncoding.AppendEncode(b, payload)
	b = append(b, ' ')
	b = hex.AppendEncode(b, frameMAC(fw.key, t, seq, payload))
	b = append(b, '\n')
	fw.buf = b
	if _, err := fw.w.Write(b); err != nil {
		return fmt.Errorf("write %s frame: %w", t, err)
	}
	return nil
}

// WriteJSON writes one frame whose payload is v encoded as JSON.
func (fw *FrameWriter) WriteJSON(t FrameType, v any) error {
	p, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("write %s frame: %w", t, err)
	}
	return fw.WriteFrame(t, p)
}

// Stream returns an io.Writer that sends everything written to it as frames
// of type t, split at MaxPayload.
func (fw *FrameWriter) Stream(t FrameType) io.Writer {
	return streamWriter{fw: fw, t: t}
}

type streamWriter struct {
	fw *FrameWriter
	t  FrameType
}

func (s streamWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), MaxPayload)]
		if err := s.fw.WriteFrame(s.t, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}

// FrameReader splits a console byte stream into frames and noise. It is not
// safe for concurrent use.
type FrameReader struct {
	br       *bufio.Reader
	key      []byte
	last     uint64
	rejected uint64
	lost     uint64
	pending  []Frame
}

// NewReader returns a FrameReader over r that accepts frames authenticated
// with key.
func NewReader(r io.Reader, key []byte) *FrameReader {
	return &FrameReader{br: bufio.NewReaderSize(r, maxLine), key: bytes.Clone(key)}
}

// Rejected counts lines that carried the frame marker but failed
// authentication, parsing or the sequence check; they were returned as
// noise.
func (fr *FrameReader) Rejected() uint64 { return fr.rejected }

// Lost counts sequence numbers skipped between accepted frames: frames
// damaged on the way (usually by a kernel message written into the middle
// of the line).
func (fr *FrameReader) Lost() uint64 { return fr.lost }

// Next returns the next frame or noise line. At the end of the stream it
// returns io.EOF; a final line without a newline is returned first.
func (fr *FrameReader) Next() (Frame, error) {
	for len(fr.pending) == 0 {
		line, err := fr.br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// Only noise gets this long: a frame line is far shorter.
			return Frame{Type: FrameNoise, Payload: bytes.Clone(line)}, nil
		}
		if len(line) > 0 {
			fr.parseLine(line)
			continue
		}
		if err != nil {
			return Frame{}, err
		}
	}
	f := fr.pending[0]
	fr.pending = fr.pending[1:]
	return f, nil
}

func (fr *FrameReader) parseLine(line []byte) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	i := bytes.Index(line, []byte(frameMagic))
	if i < 0 {
		fr.pending = append(fr.pending, Frame{Type: FrameNoise, Payload: bytes.Clone(line)})
		return
	}
	if i > 0 {
		fr.pending = append(fr.pending, Frame{Type: FrameNoise, Payload: bytes.Clone(line[:i])})
	}
	rec := line[i:]
	f, ok := fr.verify(rec[len(frameMagic):])
	if !ok {
		fr.rejected++
		fr.pending = append(fr.pending, Frame{Type: FrameNoise, Payload: bytes.Clone(rec)})
		return
	}
	fr.lost += f.Seq - fr.last - 1
	fr.last = f.Seq
	fr.pending = append(fr.pending, f)
}

func (fr *FrameReader) verify(rec []byte) (Frame, bool) {
	fields := bytes.Split(rec, []byte(" "))
	if len(fields) != 4 {
		return Frame{}, false
	}
	t := FrameType(fields[0])
	if !validType(t) {
		return Frame{}, false
	}
	seqText := fields[1]
	if len(seqText) == 0 || seqText[0] == '0' || seqText[0] == '+' {
		return Frame{}, false
	}
	seq, err := strconv.ParseUint(string(seqText), 10, 64)
	if err != nil || seq <= fr.last {
		return Frame{}, false
	}
	payload, err := strictBase64.AppendDecode(nil, fields[2])
	if err != nil || len(payload) > MaxPayload {
		return Frame{}, false
	}
	// Only the canonical encoding is accepted, so one frame has one line.
	if len(fields[3]) != 2*macBytes || bytes.ContainsFunc(fields[3], func(r rune) bool { return r >= 'A' && r <= 'F' }) {
		return Frame{}, false
	}
	mac := make([]byte, macBytes)
	if _, err := hex.Decode(mac, fields[3]); err != nil {
		return Frame{}, false
	}
	if !hmac.Equal(mac, frameMAC(fr.key, t, string(seqText), payload)) {
		return Frame{}, false
	}
	return Frame{Type: t, Seq: seq, Payload: payload}, true
}
