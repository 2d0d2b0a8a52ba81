python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site PATH=$PWD/.bin/bin:$PATH LD_LIBRARY_PATH=$PWD/.bin/lib PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
