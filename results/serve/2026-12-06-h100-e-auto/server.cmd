build-rooms-cuda/moe serve --model /work/main/bench-results/hub-model --device cuda --dtype bf16 --port 0 --max-batch 32 --max-queue 128 --max-tokens-in-flight 16384 --experts auto
