"""Native CPU kernels: SPG-masked optimizer steps in one pass, compiled from C on first use."""
