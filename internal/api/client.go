package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/pool"
)

// Client talks to a fireactions daemon's API.
type Client struct {
	base  string
	token config.Secret
	hc    *http.Client
}

// NewClient returns a client for the API at address (host:port, or a full
// http:// URL) sending token.
func NewClient(address string, token config.Secret) *Client {
	return NewClientWithHTTP(address, token, &http.Client{})
}

// NewClientWithHTTP is NewClient with the HTTP client to use.
func NewClientWithHTTP(address string, token config.Secret, hc *http.Client) *Client {
	base := address
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	return &Client{base: strings.TrimSuffix(base, "/"), token: token, hc: hc}
}

// APIError is an error answer of the daemon.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("fireactions API: %s (HTTP %d)", e.Message, e.Status)
}

// ErrNotFound matches a 404 answer with errors.Is.
var ErrNotFound = errors.New("not found")

func (e *APIError) Is(target error) bool {
	return target == ErrNotFound && e.Status == http.StatusNotFound
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("fireactions API %s %s: %w", method, path, err)
	}
	return nil
}

func (c *Client) send(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, r)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token.Reveal())
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach the fireactions daemon at %s (is `fireactions serve` running?): %w", c.base, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var e Error
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		if json.Unmarshal(raw, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(raw))
		}
		return nil, &APIError{Status: resp.StatusCode, Message: e.Error}
	}
	return resp, nil
}

// Health checks that the daemon answers.
func (c *Client) Health(ctx context.Context) (Health, error) {
	var h Health
	return h, c.do(ctx, http.MethodGet, "/v1/health", nil, &h)
}

// Version returns the daemon's version.
func (c *Client) Version(ctx context.Context) (Version, error) {
	var v Version
	return v, c.do(ctx, http.MethodGet, "/v1/version", nil, &v)
}

// Pools lists the pools.
func (c *Client) Pools(ctx context.Context) ([]pool.Status, error) {
	var out []pool.Status
	return out, c.do(ctx, http.MethodGet, "/v1/pools", nil, &out)
}

// Pool returns one pool.
func (c *Client) Pool(ctx context.Context, name string) (pool.Status, error) {
	var out pool.Status
	return out, c.do(ctx, http.MethodGet, "/v1/pools/"+url.PathEscape(name), nil, &out)
}

// Scale sets a pool's minimum and/or maximum.
func (c *Client) Scale(ctx context.Context, name string, req ScaleRequest) (pool.Status, error) {
	var out pool.Status
	return out, c.do(ctx, http.MethodPost, "/v1/pools/"+url.PathEscape(name)+"/scale", req, &out)
}

// Pause pauses a pool.
func (c *Client) Pause(ctx context.Context, name string) (pool.Status, error) {
	var out pool.Status
	return out, c.do(ctx, http.MethodPost, "/v1/pools/"+url.PathEscape(name)+"/pause", nil, &out)
}

// Resume resumes a pool.
func (c *Client) Resume(ctx context.Context, name string) (pool.Status, error) {
	var out pool.Status
	return out, c.do(ctx, http.MethodPost, "/v1/pools/"+url.PathEscape(name)+"/resume", nil, &out)
}

// VMs lists the runner VMs.
func (c *Client) VMs(ctx context.Context) ([]pool.VMStatus, error) {
	var out []pool.VMStatus
	return out, c.do(ctx, http.MethodGet, "/v1/vms", nil, &out)
}

// VM returns one runner VM.
func (c *Client) VM(ctx context.Context, id string) (pool.VMStatus, error) {
	var out pool.VMStatus
	return out, c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(id), nil, &out)
}

// StopVM stops a runner VM.
func (c *Client) StopVM(ctx context.Context, id string) (pool.VMStatus, error) {
	var out pool.VMStatus
	return out, c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(id)+"/stop", nil, &out)
}

// Logs copies a runner VM's output to w; with follow until the VM ends.
func (c *Client) Logs(ctx context.Context, id string, follow bool, w io.Writer) error {
	q := ""
	if follow {
		q = "?follow=true"
	}
	resp, err := c.send(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(id)+"/logs"+q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	return err
}

// Images lists the cached images.
func (c *Client) Images(ctx context.Context) ([]image.Image, error) {
	var out []image.Image
	return out, c.do(ctx, http.MethodGet, "/v1/images", nil, &out)
}

// RemoveImage removes a cached image by reference or digest.
func (c *Client) RemoveImage(ctx context.Context, ref string) (RemovedImages, error) {
	var out RemovedImages
	return out, c.do(ctx, http.MethodDelete, "/v1/images?ref="+url.QueryEscape(ref), nil, &out)
}
