# make demo: set up, then the main job end to end on CPU. make test: what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := out/demo
C_SOURCES := runtime/include/*.h runtime/python/ext/*.cpp runtime/src/*.cpp runtime/src/*.hpp runtime/tests/*.cpp runtime/tests/*.c runtime/examples/*.c kernels/*/*.cpp kernels/cuda/*.cu kernels/tests/*.cu kernels/include/*.h
PY_SOURCES := export tools distill runtime/python tests benchmarks
INSTALL_INPUTS := $(shell find runtime export tools distill kernels -type f -not -path '*/__pycache__/*' 2>/dev/null) pyproject.toml CMakeLists.txt

.PHONY: demo test setup lint format

setup: $(VENV)/.installed

$(VENV)/.installed: $(INSTALL_INPUTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build from local disk, never the multi-GB CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q ".[test]"
	touch $@

demo: setup
	mkdir -p $(DEMO)
	# Words to a picture: the toy pipeline trained by the project (models/toy-pipeline: tokenizers, text encoders, VAE;
	# models/toy-sd3.safetensors: the 1.x student distilled by distill-1x from models/toy-sd3-teacher.safetensors),
	# each transformer exported with the pipeline into one bundle, run by the C runtime.
	$(VENV)/bin/export-engine models/toy-sd3.safetensors --pipeline models/toy-pipeline -o $(DEMO)/toy.engine --force -q
	$(VENV)/bin/export-engine models/toy-sd3-teacher.safetensors --pipeline models/toy-pipeline -o $(DEMO)/toy-teacher.engine --force -q
	$(VENV)/bin/slimengine generate $(DEMO)/toy.engine "a red circle" -o $(DEMO)/red-circle.png
	# The 18 class prompts: the teacher's grid (28 steps, CFG 4: 56 NFE), the student's (1.x: 1.5 NFE), both side by side.
	$(PY) -m slimengine.tools.toy_demo $(DEMO)/toy-teacher.engine -o $(DEMO)/toy-shapes.png
	$(PY) -m slimengine.tools.toy_demo $(DEMO)/toy.engine -o $(DEMO)/toy-shapes-1x.png --teacher $(DEMO)/toy-teacher.engine \
		--compare $(DEMO)/toy-teacher-vs-1x.png
	# A small random 1.x-Distill SD3 checkpoint through export, verification and the C example program.
	$(VENV)/bin/make-sd3-checkpoint --preset small -o $(DEMO)/sd3-small.pt
	$(VENV)/bin/export-engine $(DEMO)/sd3-small.pt -o $(DEMO)/sd3-small.engine --force --verify
	SLIMENGINE_ORT_LIBRARY=$$($(PY) -m slimengine.paths ort) $$($(PY) -m slimengine.paths example) \
		$(DEMO)/sd3-small.engine --size 64 --text-len 77 --out $(DEMO)/latents.f32

lint: setup
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(C_SOURCES)

format: setup
	$(VENV)/bin/ruff check --fix $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(C_SOURCES)

test: lint
	$(PY) -m pytest -q --durations=30 tests
