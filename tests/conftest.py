import os

# Tests run on the CPU with xdist's two workers:
# - keep XLA from grabbing every core per process;
# - compile with LLVM's cheap pipeline: test shapes are tiny, so compile time dominates run time,
#   and these two flags halve the suite's CPU time. XLA's HLO passes (fusion, precision) still
#   run; only LLVM's machine-code optimisation is cut, which may reorder float arithmetic at the
#   rounding level and leaves the tests' stated tolerances untouched.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
