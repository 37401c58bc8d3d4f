// Package qmp is a small client for the QEMU Machine Protocol: JSON
// commands and asynchronous events over a stream socket. It covers what the
// qemu VM backend needs (capabilities negotiation, commands with ids, event
// delivery) and nothing else.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// Event is an asynchronous QMP event such as SHUTDOWN or POWERDOWN.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data,omitempty"`
	Time time.Time       `json:"-"`
}

// Error is an error answer to a command.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Class + ": " + e.Desc }

// ErrClosed is returned for commands on a closed connection.
var ErrClosed = errors.New("qmp: connection closed")

type message struct {
	Return    json.RawMessage `json:"return"`
	Error     *Error          `json:"error"`
	ID        string          `json:"id"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	QMP *struct {
		Version json.RawMessage `json:"version"`
	} `json:"QMP"`
}

type result struct {
	ret json.RawMessage
	err error
}

// Client is one QMP connection. Commands may be issued concurrently.
type Client struct {
	conn    net.Conn
	onEvent func(Event)

	wmu     sync.Mutex // serialises writes
	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan result
	err     error
	done    chan struct{}
}

// Connect performs the QMP handshake on conn (greeting, then
// qmp_capabilities) within ctx and starts reading. onEvent, if not nil, is
// called from the reading goroutine for every event; it must not block.
func Connect(ctx context.Context, conn net.Conn, onEvent func(Event)) (*Client, error) {
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	r := bufio.NewReader(conn)
	line, err := r.ReadBytes('\n')
	if err != nil {
		stop()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	var greet message
	if err := json.Unmarshal(line, &greet); err != nil || greet.QMP == nil {
		stop()
		return nil, fmt.Errorf("qmp greeting: unexpected %q", line)
	}
	c := &Client{conn: conn, onEvent: onEvent, pending: map[string]chan result{}, done: make(chan struct{})}
	go c.read(r)
	_, err = c.Execute(ctx, "qmp_capabilities", nil)
	if !stop() {
		// ctx ended during the handshake: the deadline is poisoned.
		c.Close()
		if err == nil {
			err = ctx.Err()
		}
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("qmp_capabilities: %w", err)
	}
	return c, nil
}

func (c *Client) read(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = r.ReadBytes('\n')
		if err != nil {
			break
		}
		var m message
		if json.Unmarshal(line, &m) != nil {
			continue
		}
		if m.Event != "" {
			if c.onEvent != nil {
				ev := Event{Name: m.Event, Data: m.Data}
				if m.Timestamp != nil {
					ev.Time = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
				}
				c.onEvent(ev)
			}
			continue
		}
		c.mu.Lock()
		ch := c.pending[m.ID]
		delete(c.pending, m.ID)
		c.mu.Unlock()
		if ch == nil {
			continue
		}
		if m.Error != nil {
			ch <- result{err: m.Error}
		} else {
			ch <- result{ret: m.Return}
		}
	}
	c.mu.Lock()
	c.err = err
	for id, ch := range c.pending {
		ch <- result{err: fmt.Errorf("%w: %v", ErrClosed, err)}
		delete(c.pending, id)
	}
	c.mu.Unlock()
	close(c.done)
}

// Execute runs a command and returns its "return" value. When ctx ends
// first, the command may still run in QEMU.
func (c *Client) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	ch := make(chan result, 1)
	c.mu.Lock()
	if c.err != nil || c.isDone() {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	c.nextID++
	id := strconv.FormatUint(c.nextID, 10)
	c.pending[id] = ch
	c.mu.Unlock()

	req := map[string]any{"execute": command, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	c.wmu.Lock()
	_, err = c.conn.Write(append(b, '\n'))
	c.wmu.Unlock()
	if err != nil {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("qmp %s: %w", command, r.err)
		}
		return r.ret, nil
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
		return nil, fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
}

func (c *Client) isDone() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// Done is closed when the connection ends (QEMU exited or Close).
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the connection.
func (c *Client) Close() error { return c.conn.Close() }
