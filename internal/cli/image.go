package cli

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/aetherium/aetherium-core/pkg/image"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// newImageCmd is `aether-cli image`: build and inspect guest images. It
// works on the local image cache and needs no running services.
func (a *app) newImageCmd() *cobra.Command {
	var cacheDir string
	img := &cobra.Command{Use: "image", Short: "Build and inspect guest images (kernel, initramfs, rootfs)"}
	img.PersistentFlags().StringVar(&cacheDir, "cache-dir", "", "image cache (default: $"+image.CacheDirEnv+", else the config's vmm.image_dir, /var/cache/aetherium)")
	img.AddCommand(a.imageBuildCmd(&cacheDir), a.imageListCmd(&cacheDir), a.imageShowCmd(&cacheDir))
	return img
}

func (a *app) imageBuildCmd(cacheDir *string) *cobra.Command {
	var o image.Options
	cmd := &cobra.Command{
		Use:   "build [--from-tar FILE | --from-dir DIR] [--rootfs-size-mb N] [--agent PATH]",
		Short: "Build a guest image, or find the one already built from the same inputs",
		Long: "Builds Debian's cloud kernel (bzImage and ELF vmlinux), an initramfs with fc-agent as /init,\n" +
			"and a root file system (debootstrap minbase by default) as rootfs.ext4 and rootfs.tar.\n" +
			"The first debootstrap build takes minutes; rebuilding from the same inputs is a no-op.",
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) (err error) {
			if o.FromTar != "" && o.FromDir != "" {
				return usageError{fmt.Errorf("give --from-tar or --from-dir, not both")}
			}
			if o.AgentPath == "" {
				p, err := defaultAgent()
				if err != nil {
					return err
				}
				o.AgentPath = p
			}
			if o.CacheDir, err = a.imageCacheDir(*cacheDir); err != nil {
				return err
			}
			o.Logger = slog.New(slog.NewTextHandler(a.stderr, nil))
			// Ctrl-C stops debootstrap and removes the half-built image.
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			m, err := image.Build(ctx, o)
			if err != nil {
				return err
			}
			return a.printImage(m)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.FromTar, "from-tar", "", "make the rootfs from this tar (e.g. `docker export` output) instead of debootstrap")
	f.StringVar(&o.FromDir, "from-dir", "", "make the rootfs from this directory tree instead of debootstrap")
	f.IntVar(&o.RootfsSizeMB, "rootfs-size-mb", image.DefaultRootfsSizeMB, "size of rootfs.ext4 in MiB (a sparse file)")
	f.StringVar(&o.AgentPath, "agent", "", "static fc-agent binary (default: fc-agent next to aether-cli)")
	f.StringVar(&o.KernelDeb, "kernel-deb", "", "use this kernel .deb instead of the current "+image.KernelMetaPackage)
	f.StringVar(&o.Suite, "suite", "", "Debian suite for debootstrap (default "+image.DefaultSuite+")")
	f.StringVar(&o.Mirror, "mirror", "", "Debian mirror for debootstrap (default: the first URI of this machine's apt sources)")
	return cmd
}

// imageCacheDir picks the image cache: the flag, $AETHERIUM_IMAGE_DIR, or
// the configuration's vmm.image_dir (which the worker reads too).
func (a *app) imageCacheDir(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if v := os.Getenv(image.CacheDirEnv); v != "" {
		return v, nil
	}
	c, err := a.config()
	if err != nil {
		return "", err
	}
	return c.VMM.ImageDir, nil
}

// defaultAgent finds fc-agent next to the running aether-cli (bin/).
func defaultAgent() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("finding aether-cli's directory: %w; pass --agent", err)
	}
	if r, err := filepath.EvalSymlinks(exe); err == nil {
		exe = r
	}
	p := filepath.Join(filepath.Dir(exe), "fc-agent")
	if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%w: no fc-agent next to aether-cli (%s); build it with `make build` or pass --agent PATH", types.ErrInvalid, p)
	}
	return p, nil
}

func (a *app) imageListCmd(cacheDir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List built guest images, newest first",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := a.imageCacheDir(*cacheDir)
			if err != nil {
				return err
			}
			ms, err := image.List(dir)
			if err != nil {
				return err
			}
			if a.json {
				if ms == nil {
					ms = []*image.Manifest{}
				}
				return a.printJSON(ms)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tCREATED\tKERNEL\tAGENT\tROOTFS")
			for _, m := range ms {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s (%d MiB)\n", m.ID, m.Created.Format("2006-01-02 15:04:05Z07:00"),
					m.Kernel.Release, m.Agent.Version, m.Rootfs.Source, m.Rootfs.SizeMB)
			}
			return tw.Flush()
		},
	}
}

func (a *app) imageShowCmd(cacheDir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "show [ID]",
		Short: "Show one guest image (default: the newest), with its file paths",
		Args:  args(cobra.MaximumNArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			dir, err := a.imageCacheDir(*cacheDir)
			if err != nil {
				return err
			}
			var m *image.Manifest
			if len(argv) == 1 {
				m, err = image.Find(dir, argv[0])
			} else {
				m, err = image.Latest(dir)
			}
			if err != nil {
				return err
			}
			return a.printImage(m)
		},
	}
}

// imageView is the JSON shape of an image: its manifest plus its paths.
type imageView struct {
	*image.Manifest
	Dir   string            `json:"dir"`
	Paths map[string]string `json:"paths"`
}

func (a *app) printImage(m *image.Manifest) error {
	if a.json {
		v := imageView{Manifest: m, Dir: m.Dir, Paths: map[string]string{}}
		for name := range m.Files {
			v.Paths[name] = m.Path(name)
		}
		return a.printJSON(v)
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "id\t%s\ndir\t%s\ncreated\t%s\nkernel\t%s %s (%s, pvh %v)\nagent\t%s\nrootfs\t%s, %d MiB\n",
		m.ID, m.Dir, m.Created.Format("2006-01-02 15:04:05Z07:00"), m.Kernel.Package, m.Kernel.Version,
		m.Kernel.Compression, m.Kernel.PVH, m.Agent.Version, m.Rootfs.Source, m.Rootfs.SizeMB)
	for _, name := range []string{image.FileVmlinuz, image.FileVmlinux, image.FileInitramfs, image.FileRootfs, image.FileRootfsTar} {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", name, humanSize(m.Sizes[name]), m.Path(name))
	}
	return tw.Flush()
}

func humanSize(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
