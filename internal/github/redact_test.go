package github_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/github"
)

func TestJITConfigNeverPrinted(t *testing.T) {
	const secret = "ZXlKMWNtd2lPaUpvZEhSd2N6b3ZMMlY0WVcxd2JHVXVZMjl0SW4w"
	jit := github.JITConfig{RunnerID: 7, Name: "fa-1", EncodedJITConfig: secret}
	vm := struct {
		ID  string
		JIT github.JITConfig
		Ptr *github.JITConfig
	}{"vm-1", jit, &jit}

	var out bytes.Buffer
	fmt.Fprintf(&out, "%v %+v %#v %s %v %+v", jit, jit, jit, jit, vm, vm)
	j, err := json.Marshal(vm)
	if err != nil {
		t.Fatal(err)
	}
	out.Write(j)
	for _, h := range []slog.Handler{slog.NewTextHandler(&out, nil), slog.NewJSONHandler(&out, nil)} {
		l := slog.New(h)
		l.Info("vm", "vm", vm, "jit", jit, "ptr", &jit)
		l.Info("attrs", slog.Any("jit", jit), slog.Group("g", slog.Any("vm", vm)))
	}
	if strings.Contains(out.String(), secret) {
		t.Fatalf("the JIT config leaked:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "fa-1") || !strings.Contains(out.String(), "[redacted]") {
		t.Fatalf("output lacks the runner name or the redaction marker:\n%s", out.String())
	}
	if jit.EncodedJITConfig.Reveal() != secret {
		t.Fatal("Reveal lost the value")
	}
}

func TestClientLogsCarryNoSecrets(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	jit, err := e.client.GenerateJITConfig(ctx, github.OrgScope("acme"), "fa-1", []string{"linux"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := set.OpenSession(ctx, github.SessionOptions{Owner: "h"})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(context.Background())
	if _, err := set.GenerateJITConfig(ctx, "pool-a-1"); err != nil {
		t.Fatal(err)
	}
	// The logs were written (so the check below means something) and name
	// the runner, not its configuration.
	logs := e.logs.String()
	if !strings.Contains(logs, `"runner":"fa-1"`) || !strings.Contains(logs, "opened message session") {
		t.Fatalf("unexpected logs:\n%s", logs)
	}
	if len(e.fake.Secrets()) < 5 {
		t.Fatalf("the fake recorded only %d secrets", len(e.fake.Secrets()))
	}
	assertNoSecrets(t, e.fake, logs+fmt.Sprint(jit))
}
