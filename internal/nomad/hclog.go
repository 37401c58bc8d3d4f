package nomad

import (
	"context"
	"log/slog"

	hclog "github.com/hashicorp/go-hclog"
)

// hclogHandler is a slog.Handler writing to an hclog.Logger. Nomad reads a
// plugin's log lines from its stderr in hclog's JSON format, so the
// fireactions packages (which log with slog) must end up in hclog to show
// in the agent's log with the right level.
type hclogHandler struct {
	l      hclog.Logger
	prefix string // group prefix for attribute keys, "a.b."
}

// newSlogLogger returns a slog.Logger that logs through l.
func newSlogLogger(l hclog.Logger) *slog.Logger {
	return slog.New(&hclogHandler{l: l})
}

func hclogLevel(l slog.Level) hclog.Level {
	switch {
	case l >= slog.LevelError:
		return hclog.Error
	case l >= slog.LevelWarn:
		return hclog.Warn
	case l >= slog.LevelInfo:
		return hclog.Info
	case l >= slog.LevelDebug:
		return hclog.Debug
	default:
		return hclog.Trace
	}
}

func (h *hclogHandler) Enabled(_ context.Context, l slog.Level) bool {
	return h.l.GetLevel() <= hclogLevel(l)
}

func (h *hclogHandler) Handle(_ context.Context, r slog.Record) error {
	args := make([]any, 0, 2*r.NumAttrs())
	r.Attrs(func(a slog.Attr) bool {
		args = appendAttr(args, h.prefix, a)
		return true
	})
	h.l.Log(hclogLevel(r.Level), r.Message, args...)
	return nil
}

func appendAttr(args []any, prefix string, a slog.Attr) []any {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "."
		}
		for _, g := range v.Group() {
			args = appendAttr(args, p, g)
		}
		return args
	}
	if a.Key == "" {
		return args
	}
	return append(args, prefix+a.Key, v.Any())
}

func (h *hclogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	var args []any
	for _, a := range attrs {
		args = appendAttr(args, h.prefix, a)
	}
	return &hclogHandler{l: h.l.With(args...), prefix: h.prefix}
}

func (h *hclogHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	return &hclogHandler{l: h.l, prefix: h.prefix + name + "."}
}
