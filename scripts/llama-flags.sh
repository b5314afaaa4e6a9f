# Sourced by setup.sh and llama-server.sh: how llama.cpp is compiled here.
# On x86-64, for the portable baseline that llama.cpp enables without -march=native (AVX, AVX2,
# BMI2, FMA, F16C), as the Dockerfile does. A native build turns on llama.cpp's AMX kernels on
# CPUs that have AMX (Sapphire Rapids and later), and on these machines they segfault in the
# first multi-token prefill (ggml_backend_amx_mul_mat); a native build is also what pip's
# wheel cache would hand to another CPU. Elsewhere (ARM) native is kept: no AMX there.
# LLAMA_CMAKE_ARGS overrides the choice; the build caches are keyed by it.
llama_version=0.3.36  # the llama-cpp-python pin in pyproject.toml
if [ -z "${LLAMA_CMAKE_ARGS+x}" ]; then
  case "$(uname -m)" in
    x86_64 | amd64) LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF" ;;
    *) LLAMA_CMAKE_ARGS="" ;;
  esac
fi
llama_build_key=$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-10)
