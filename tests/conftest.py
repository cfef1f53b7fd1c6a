import os

# Tests run on the CPU; keep XLA from grabbing every core per process when xdist runs two workers.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
