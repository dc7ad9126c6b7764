package api

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// parseWait reads ?wait= as a duration ("30s") or whole seconds ("30"),
// capped at MaxWait.
func parseWait(r *http.Request) (time.Duration, error) {
	v := r.URL.Query().Get("wait")
	if v == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		n, nerr := strconv.Atoi(v)
		if nerr != nil {
			return 0, badRequest("wait=%q is not a duration such as 30s", v)
		}
		d = time.Duration(n) * time.Second
	}
	if d < 0 {
		return 0, badRequest("wait=%q is negative", v)
	}
	return min(d, MaxWait), nil
}

func (s *Server) getTask(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	wait, err := parseWait(r)
	if err != nil {
		return err
	}
	t, err := s.svc.GetTask(r.Context(), id)
	if err != nil {
		return err
	}
	if wait > 0 && !t.State.Terminal() {
		ctx, cancel := context.WithTimeout(r.Context(), wait)
		ctx, stop := s.waitCtx(ctx)
		wt, err := s.svc.WaitTask(ctx, id)
		stop()
		cancel()
		switch {
		case err == nil:
			t = wt
		case r.Context().Err() != nil:
			return r.Context().Err()
		case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
			// The wait ran out (or the server is draining): answer the
			// task as it is now.
			if t, err = s.svc.GetTask(r.Context(), id); err != nil {
				return err
			}
		default:
			return err
		}
	}
	return writeJSON(w, http.StatusOK, t)
}

func (s *Server) cancelTask(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	if err := s.svc.CancelTask(r.Context(), id); err != nil {
		return err
	}
	t, err := s.svc.GetTask(r.Context(), id)
	if err != nil {
		return err
	}
	s.log.Info("task cancelled", "task_id", id, "vm_id", t.VMID, "key_id", infoOf(r.Context()).keyID)
	return writeJSON(w, http.StatusOK, t)
}

func (s *Server) getExecution(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	e, err := s.svc.GetExecution(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, e)
}

func (s *Server) listExecutions(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	es, err := s.svc.GetExecutions(r.Context(), id)
	if err != nil {
		return err
	}
	if es == nil {
		es = []*types.Execution{}
	}
	return writeJSON(w, http.StatusOK, map[string][]*types.Execution{"executions": es})
}

func (s *Server) runJob(w http.ResponseWriter, r *http.Request) error {
	vmID, err := pathID(r, "id")
	if err != nil {
		return err
	}
	var req JobRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	cmds := make([]types.Command, 0, len(req.Commands))
	for _, c := range req.Commands {
		cmd, err := command(c)
		if err != nil {
			return err
		}
		cmds = append(cmds, cmd)
	}
	id, err := s.svc.RunJobTask(r.Context(), vmID.String(), cmds, req.StopOnFailure)
	if err != nil {
		return err
	}
	t, err := s.svc.GetTask(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusAccepted, t)
}

func (s *Server) getJob(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	j, err := s.svc.GetJob(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, j)
}
