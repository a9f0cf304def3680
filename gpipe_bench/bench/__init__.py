"""The harness's measurements (speed, memory, accuracy); the engine micro-benchmark lives in benchmarks/engine.py."""
