"""Tools built on the library: the ``ppfast`` command line, the demo and the benchmarks."""
