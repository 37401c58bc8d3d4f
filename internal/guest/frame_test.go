package guest

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

func readAll(t testing.TB, r io.Reader, key []byte) ([]Frame, *FrameReader) {
	t.Helper()
	fr := NewReader(r, key)
	var out []Frame
	for {
		f, err := fr.Next()
		if errors.Is(err, io.EOF) {
			return out, fr
		}
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		out = append(out, f)
	}
}

func TestFramesRoundTripBetweenNoise(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf, testKey)
	buf.WriteString("[    0.1] kernel says hi\r\n")
	if err := w.WriteFrame(FrameStdout, []byte("hello\nworld\x00\x1e")); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteFrame(FrameStderr, nil); err != nil {
		t.Fatal(err)
	}
	buf.WriteString("partial kernel line without newline ")
	if err := w.WriteJSON(FrameExit, Exit{Code: 137, Signal: 9}); err != nil {
		t.Fatal(err)
	}
	buf.WriteString("tail")

	frames, fr := readAll(t, &buf, testKey)
	want := []struct {
		typ     FrameType
		seq     uint64
		payload string
	}{
		{FrameNoise, 0, "[    0.1] kernel says hi"},
		{FrameStdout, 1, "hello\nworld\x00\x1e"},
		{FrameStderr, 2, ""},
		{FrameNoise, 0, "partial kernel line without newline "},
		{FrameExit, 3, `{"code":137,"signal":9}`},
		{FrameNoise, 0, "tail"},
	}
	if len(frames) != len(want) {
		t.Fatalf("got %d frames %+v, want %d", len(frames), frames, len(want))
	}
	for i, w := range want {
		f := frames[i]
		if f.Type != w.typ || f.Seq != w.seq || string(f.Payload) != w.payload {
			t.Errorf("frame %d = %s/%d/%q, want %s/%d/%q", i, f.Type, f.Seq, f.Payload, w.typ, w.seq, w.payload)
		}
	}
	var e Exit
	if err := frames[4].DecodeJSON(&e); err != nil || e.Code != 137 || e.Signal != 9 {
		t.Errorf("exit = %+v, %v", e, err)
	}
	if fr.Rejected() != 0 || fr.Lost() != 0 {
		t.Errorf("rejected %d lost %d, want 0 0", fr.Rejected(), fr.Lost())
	}
}

func TestForgedFramesAreNoise(t *testing.T) {
	var genuine bytes.Buffer
	NewWriter(&genuine, testKey).WriteJSON(FrameExit, Exit{Code: 0})
	line := strings.TrimSuffix(genuine.String(), "\n")
	fields := strings.Split(line, " ")

	var other bytes.Buffer
	NewWriter(&other, []byte("another key, another key, another")).WriteJSON(FrameExit, Exit{Code: 0})

	forged := []string{
		other.String(), // right format, wrong key
		strings.Join([]string{fields[0], "stdout", fields[2], fields[3], fields[4]}, " ") + "\n", // type swapped
		strings.Join([]string{fields[0], fields[1], "2", fields[3], fields[4]}, " ") + "\n",      // seq changed
		strings.Join([]string{fields[0], fields[1], fields[2], "e30=", fields[4]}, " ") + "\n",   // payload changed
		line[:len(line)-2] + "\n",  // truncated mac
		"\x1eFA1 exit 1 e30= \n",   // no mac
		"\x1eFA1 exit 1\n",         // too few fields
		"\x1eFA1 EXIT 1 e30= 00\n", // bad type
	}
	for _, f := range forged {
		frames, fr := readAll(t, strings.NewReader(f), testKey)
		if len(frames) != 1 || frames[0].Type != FrameNoise {
			t.Errorf("%q: got %v, want one noise frame", f, frames)
		}
		if fr.Rejected() != 1 {
			t.Errorf("%q: rejected = %d, want 1", f, fr.Rejected())
		}
	}
}

func TestReplayAndReorderRejected(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf, testKey)
	var lines []string
	for i := 0; i < 3; i++ {
		start := buf.Len()
		w.WriteFrame(FrameStdout, []byte{byte('a' + i)})
		lines = append(lines, buf.String()[start:])
	}
	// 1, 3, then the replayed 1 and the late 2.
	stream := lines[0] + lines[2] + lines[0] + lines[1]
	frames, fr := readAll(t, strings.NewReader(stream), testKey)
	var types []string
	for _, f := range frames {
		if f.Type == FrameNoise {
			types = append(types, "noise")
			continue
		}
		types = append(types, string(f.Type)+":"+string(f.Payload))
	}
	got := strings.Join(types, ",")
	if got != "stdout:a,stdout:c,noise,noise" {
		t.Errorf("frames = %s", got)
	}
	if fr.Rejected() != 2 || fr.Lost() != 1 {
		t.Errorf("rejected %d lost %d, want 2 1", fr.Rejected(), fr.Lost())
	}
}

func TestWriterAfterContinuesNumbering(t *testing.T) {
	var buf bytes.Buffer
	first := NewWriter(&buf, testKey)
	first.WriteFrame(FrameStop, nil)
	first.WriteFrame(FrameStop, nil)
	// A new owner that starts over is rejected; one that continues is not.
	NewWriter(&buf, testKey).WriteFrame(FrameSignal, []byte("restarted"))
	next := NewWriterAfter(&buf, testKey, first.Last()+1) // one number lost in a crash
	next.WriteFrame(FrameSignal, []byte("continued"))
	if next.Last() != 4 {
		t.Errorf("Last = %d, want 4", next.Last())
	}
	frames, fr := readAll(t, &buf, testKey)
	if len(frames) != 4 || frames[2].Type != FrameNoise || string(frames[3].Payload) != "continued" || frames[3].Seq != 4 {
		t.Errorf("frames = %+v", frames)
	}
	if fr.Rejected() != 1 || fr.Lost() != 1 {
		t.Errorf("rejected %d lost %d, want 1 1", fr.Rejected(), fr.Lost())
	}
}

func TestStreamSplitsLargeWrites(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf, testKey)
	big := bytes.Repeat([]byte("x"), 2*MaxPayload+10)
	n, err := w.Stream(FrameStdout).Write(big)
	if err != nil || n != len(big) {
		t.Fatalf("Write = %d, %v", n, err)
	}
	frames, _ := readAll(t, &buf, testKey)
	var got []byte
	for _, f := range frames {
		if f.Type != FrameStdout {
			t.Fatalf("unexpected %s frame", f.Type)
		}
		got = append(got, f.Payload...)
	}
	if len(frames) != 3 || !bytes.Equal(got, big) {
		t.Errorf("got %d frames, %d bytes", len(frames), len(got))
	}
	if err := w.WriteFrame(FrameStdout, big); err == nil {
		t.Error("WriteFrame accepted an oversized payload")
	}
	if err := w.WriteFrame(FrameNoise, nil); err == nil {
		t.Error("WriteFrame accepted the noise type")
	}
}

func TestLongNoiseLineComesInPieces(t *testing.T) {
	long := strings.Repeat("n", maxLine+100) + "\n"
	var buf bytes.Buffer
	buf.WriteString(long)
	NewWriter(&buf, testKey).WriteFrame(FrameLog, []byte("after"))
	frames, _ := readAll(t, &buf, testKey)
	total := 0
	for _, f := range frames[:len(frames)-1] {
		if f.Type != FrameNoise {
			t.Fatalf("unexpected %s", f.Type)
		}
		total += len(f.Payload)
	}
	last := frames[len(frames)-1]
	if total != maxLine+100 || last.Type != FrameLog || string(last.Payload) != "after" {
		t.Errorf("noise bytes %d, last %s %q", total, last.Type, last.Payload)
	}
}

func FuzzFrameReader(f *testing.F) {
	var buf bytes.Buffer
	w := NewWriter(&buf, testKey)
	w.WriteFrame(FrameStdout, []byte("seed"))
	w.WriteJSON(FrameExit, Exit{Code: 3})
	f.Add(buf.Bytes())
	f.Add([]byte("\x1eFA1 exit 1 e30= 0011223344556677889900aabbccddeeff\n"))
	f.Add([]byte("noise\r\n\x1eFA1 \x1eFA1 stdout 99999999999999999999999 == zz\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := NewReader(bytes.NewReader(data), testKey)
		var last uint64
		for {
			fr2, err := fr.Next()
			if err != nil {
				break
			}
			if fr2.Type == FrameNoise {
				continue
			}
			// Anything accepted must be a frame the key holder wrote:
			// re-encoding it must reproduce a line present in the input.
			if fr2.Seq <= last {
				t.Fatalf("accepted seq %d after %d", fr2.Seq, last)
			}
			last = fr2.Seq
			var re bytes.Buffer
			rw := NewWriter(&re, testKey)
			rw.seq = fr2.Seq - 1
			if err := rw.WriteFrame(fr2.Type, fr2.Payload); err != nil {
				t.Fatalf("accepted a frame that cannot be written: %v", err)
			}
			if !bytes.Contains(data, bytes.TrimSuffix(re.Bytes(), []byte("\n"))) {
				t.Fatalf("accepted frame %+v not present in input", fr2)
			}
		}
		// Without the key nothing is accepted.
		fr = NewReader(bytes.NewReader(data), []byte("a key the input never saw....."))
		for {
			f, err := fr.Next()
			if err != nil {
				break
			}
			if f.Type != FrameNoise {
				t.Fatalf("accepted %+v without the key", f)
			}
		}
	})
}

func TestConcurrentWritersKeepFramesWhole(t *testing.T) {
	var buf bytes.Buffer
	var mu sync.Mutex
	w := NewWriter(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}), testKey)
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := w.Stream(FrameStdout)
			for j := 0; j < 100; j++ {
				s.Write([]byte("payload"))
			}
		}()
	}
	wg.Wait()
	frames, fr := readAll(t, &buf, testKey)
	if len(frames) != 400 || fr.Rejected() != 0 || fr.Lost() != 0 {
		t.Errorf("%d frames, %d rejected, %d lost", len(frames), fr.Rejected(), fr.Lost())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
