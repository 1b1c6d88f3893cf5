import os

# Tests run on CPU with 8 fake devices so sharding code is exercised without GPUs.
if "XLA_FLAGS" not in os.environ or "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
