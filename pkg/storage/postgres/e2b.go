package postgres

import (
	"context"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// CreateSandbox inserts sb. A zero CreatedAt is set to now in sb.
func (s *Store) CreateSandbox(ctx context.Context, sb *storage.Sandbox) error {
	if err := required("sandbox", "vm id", sb.VMID); err != nil {
		return fmt.Errorf("creating sandbox: %w", err)
	}
	if len(sb.TokenHashes) == 0 || slices.ContainsFunc(sb.TokenHashes, func(h []byte) bool { return len(h) == 0 }) {
		return fmt.Errorf("creating sandbox %s: %w: a sandbox needs at least one token hash, none empty", sb.VMID, types.ErrInvalid)
	}
	sb.CreatedAt = orNow(sb.CreatedAt)
	_, err := s.pool.Exec(ctx, `INSERT INTO e2b_sandboxes (vm_id, template, token_hashes, created_at) VALUES ($1, $2, $3, $4)`,
		sb.VMID, sb.Template, sb.TokenHashes, sb.CreatedAt)
	if err != nil {
		return s.fail(err, "creating sandbox %s", sb.VMID)
	}
	return nil
}

// GetSandbox returns the sandbox of VM vmID.
func (s *Store) GetSandbox(ctx context.Context, vmID string) (*storage.Sandbox, error) {
	return getByID(ctx, s, "sandbox", vmID, `SELECT vm_id, template, token_hashes, created_at FROM e2b_sandboxes WHERE vm_id = $1`,
		func(row pgx.Row) (*storage.Sandbox, error) {
			var sb storage.Sandbox
			if err := row.Scan(&sb.VMID, &sb.Template, &sb.TokenHashes, &sb.CreatedAt); err != nil {
				return nil, err
			}
			sb.CreatedAt = utc(sb.CreatedAt)
			return &sb, nil
		})
}

// AddSandboxToken appends hash to the sandbox's token hashes.
func (s *Store) AddSandboxToken(ctx context.Context, vmID string, hash []byte) error {
	if len(hash) == 0 {
		return fmt.Errorf("adding a token to sandbox %s: %w: the token hash is empty", vmID, types.ErrInvalid)
	}
	tag, err := s.pool.Exec(ctx, `UPDATE e2b_sandboxes SET token_hashes = array_append(token_hashes, $2) WHERE vm_id = $1`, vmID, hash)
	if err != nil {
		return s.fail(err, "adding a token to sandbox %s", vmID)
	}
	if tag.RowsAffected() == 0 {
		return notFound("sandbox", vmID)
	}
	return nil
}

const templateColumns = `name, vcpus, memory_mb, env, created_at`

func scanTemplate(row pgx.Row) (*storage.Template, error) {
	var tpl storage.Template
	var env *string
	if err := row.Scan(&tpl.Name, &tpl.VCPUs, &tpl.MemoryMB, &env, &tpl.CreatedAt); err != nil {
		return nil, err
	}
	tpl.CreatedAt = utc(tpl.CreatedAt)
	if err := fromJSON(env, &tpl.Env); err != nil {
		return nil, fmt.Errorf("template %s: %w", tpl.Name, err)
	}
	return &tpl, nil
}

// CreateTemplate inserts tpl. A zero CreatedAt is set to now in tpl.
func (s *Store) CreateTemplate(ctx context.Context, tpl *storage.Template) error {
	if err := required("template", "name", tpl.Name); err != nil {
		return fmt.Errorf("creating template: %w", err)
	}
	env, err := toJSON(tpl.Env)
	if err != nil {
		return fmt.Errorf("creating template %s: %w", tpl.Name, err)
	}
	tpl.CreatedAt = orNow(tpl.CreatedAt)
	_, err = s.pool.Exec(ctx, `INSERT INTO templates (`+templateColumns+`) VALUES ($1, $2, $3, $4, $5)`,
		tpl.Name, tpl.VCPUs, tpl.MemoryMB, env, tpl.CreatedAt)
	if err != nil {
		return s.fail(err, "creating template %s", tpl.Name)
	}
	return nil
}

// GetTemplate returns the template called name.
func (s *Store) GetTemplate(ctx context.Context, name string) (*storage.Template, error) {
	return getByID(ctx, s, "template", name, `SELECT `+templateColumns+` FROM templates WHERE name = $1`, scanTemplate)
}

// ListTemplates returns every template, by name.
func (s *Store) ListTemplates(ctx context.Context) ([]*storage.Template, error) {
	tpls, err := queryAll(ctx, s, scanTemplate, `SELECT `+templateColumns+` FROM templates ORDER BY name`)
	if err != nil {
		return nil, s.fail(err, "listing templates")
	}
	return tpls, nil
}

// DeleteTemplate removes the template called name.
func (s *Store) DeleteTemplate(ctx context.Context, name string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM templates WHERE name = $1`, name)
	if err != nil {
		return s.fail(err, "deleting template %s", name)
	}
	if tag.RowsAffected() == 0 {
		return notFound("template", name)
	}
	return nil
}
