package image

// Internals for the external tests (package image_test), which cannot be
// internal because they use testenv, which imports this package.
var (
	FetchKernelDeb = fetchKernelDeb
	UnpackKernel   = unpackKernel
)

// KernelTree is an unpacked kernel package.
type KernelTree = kernelTree
