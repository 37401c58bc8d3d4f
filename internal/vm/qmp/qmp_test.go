package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"
)

// fakeQEMU speaks the server side of QMP on conn: greeting, capabilities,
// then answers each command with handle's reply.
func fakeQEMU(t *testing.T, conn net.Conn, handle func(cmd string, id string, w func(string))) {
	t.Helper()
	go func() {
		defer conn.Close()
		w := func(s string) { fmt.Fprintln(conn, s) }
		w(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`)
		r := bufio.NewReader(conn)
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute string `json:"execute"`
				ID      string `json:"id"`
			}
			if json.Unmarshal(line, &req) != nil {
				return
			}
			if req.Execute == "qmp_capabilities" {
				w(`{"return": {}, "id": "` + req.ID + `"}`)
				continue
			}
			handle(req.Execute, req.ID, w)
		}
	}()
}

func TestCommandsEventsAndErrors(t *testing.T) {
	client, server := net.Pipe()
	fakeQEMU(t, server, func(cmd, id string, w func(string)) {
		switch cmd {
		case "system_powerdown":
			w(`{"timestamp": {"seconds": 100, "microseconds": 5}, "event": "POWERDOWN"}`)
			w(`{"return": {}, "id": "` + id + `"}`)
		case "query-status":
			w(`{"return": {"status": "running", "running": true}, "id": "` + id + `"}`)
		default:
			w(`{"error": {"class": "CommandNotFound", "desc": "The command ` + cmd + ` has not been found"}, "id": "` + id + `"}`)
		}
	})
	events := make(chan Event, 4)
	ctx := context.Background()
	c, err := Connect(ctx, client, func(e Event) { events <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Execute(ctx, "system_powerdown", nil); err != nil {
		t.Fatal(err)
	}
	if e := <-events; e.Name != "POWERDOWN" || !e.Time.Equal(time.Unix(100, 5000)) {
		t.Fatalf("event = %+v", e)
	}
	ret, err := c.Execute(ctx, "query-status", nil)
	if err != nil || string(ret) != `{"status": "running", "running": true}` {
		t.Fatalf("query-status = %s, %v", ret, err)
	}
	_, err = c.Execute(ctx, "bogus", map[string]any{"x": 1})
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("bogus = %v, want a CommandNotFound error", err)
	}
}

func TestConnectionLoss(t *testing.T) {
	client, server := net.Pipe()
	fakeQEMU(t, server, func(cmd, id string, w func(string)) {
		server.Close() // QEMU dies mid-command
	})
	c, err := Connect(context.Background(), client, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Execute(context.Background(), "quit", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("command on a dying connection: %v, want ErrClosed", err)
	}
	<-c.Done()
	if _, err := c.Execute(context.Background(), "quit", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("command after close: %v", err)
	}
}

func TestHandshakeBoundByContext(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close() // a peer that never greets
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := Connect(ctx, client, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("connect to a silent peer: %v, want deadline exceeded", err)
	}
}

func TestNotQMP(t *testing.T) {
	client, server := net.Pipe()
	go func() { fmt.Fprintln(server, `{"hello": 1}`); server.Close() }()
	if _, err := Connect(context.Background(), client, nil); err == nil {
		t.Fatal("accepted a peer that is not QMP")
	}
}
