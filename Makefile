# Build of the framework. `make` builds every program whose dependencies are present and says
# which it skipped; `make test` runs the CPU suite; `make train` trains with defaults (fetching
# and tokenizing the default corpus the first time); `make data` only prepares the corpus;
# `make test-gpu` runs the CUDA-vs-CPU suite on a GPU machine; `make plot` draws a run's log.
# Missing Debian packages are installed by `make deps` (run by train/test) when we are root.

CXX      ?= g++
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_HOME ?= $(if $(NVCC),$(patsubst %/bin/nvcc,%,$(NVCC)),/usr/local/cuda)
CXXFLAGS ?= -O2 -march=native -g
CXXFLAGS += -std=c++17 -Wall -Wextra -Wno-unused-parameter -fopenmp -MMD -MP -I. -Isrc
LDFLAGS  += -fopenmp -lpthread
BUILD    := build
JOBS     ?= $(shell nproc 2>/dev/null || echo 2)
OUT      ?= out
DATA     ?= $(HOME)/.cache/gpt-framework/brown
RUN      ?= $(OUT)

# GPU architecture: the GPU that is present, ARCH= to override, sm_90 without a GPU.
ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
ifeq ($(ARCH),)
ARCH := 90
endif
GENCODE = -gencode=arch=compute_$(ARCH),code=sm_$(ARCH)
NVCCFLAGS ?= -O3 -lineinfo
NVCCFLAGS += -std=c++17 $(GENCODE) --expt-relaxed-constexpr \
             -I. -Isrc -Xcompiler -fopenmp -MMD -MP

# ---- which optional dependencies are here
HAVE_PCRE2 := $(shell test -f /usr/include/pcre2.h && echo 1)
HAVE_GTEST := $(shell test -d /usr/include/gtest && echo 1)
HAVE_NVCC  := $(if $(NVCC),1,)
HAVE_MPI   := $(shell command -v mpicxx >/dev/null 2>&1 && echo 1)

# ---- sources
CORE_SRC  := $(filter-out src/launch_mpi.cpp, $(wildcard src/*.cpp)) $(wildcard src/attention/*.cpp) $(wildcard models/*.cpp) \
             $(filter-out data/prepare.cpp data/pretokenize.cpp, $(wildcard data/*.cpp))
CUDA_SRC  := $(wildcard cuda/*.cu) $(wildcard cuda/attention/*.cu)
CORE_OBJ  := $(CORE_SRC:%.cpp=$(BUILD)/obj/%.o)
CUDA_OBJ  := $(CUDA_SRC:%.cu=$(BUILD)/obj/%.o)
PRETOK_OBJ := $(BUILD)/obj/data/pretokenize.o
UNIT_SRC  := $(wildcard tests/unit/*.cpp)
GPU_SRC   := $(wildcard tests/gpu/*.cpp) $(wildcard tests/gpu/*.cu)

ifeq ($(HAVE_NVCC),1)
BACKEND_OBJ := $(CUDA_OBJ)
BACKEND_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt -lnccl
else
BACKEND_OBJ := $(BUILD)/obj/backend/cuda_stub.o
BACKEND_LIBS :=
endif

# MPI launch (src/launch_mpi.cpp) only where mpicxx exists; otherwise launch.cpp's weak stub says "no MPI"
ifeq ($(HAVE_MPI),1)
MPI_OBJ  := $(BUILD)/obj/src/launch_mpi.o
MPI_LIBS := $(shell mpicxx --showme:link 2>/dev/null || mpicxx -link_info 2>/dev/null | cut -d' ' -f2-)
endif

PROGRAMS := $(BUILD)/train $(if $(wildcard train/attn.cpp),$(BUILD)/attn)
ifeq ($(HAVE_PCRE2),1)
PROGRAMS += $(BUILD)/prepare
endif

.PHONY: all deps deps-build deps-data test test-gpu train data plot clean bench
all: $(PROGRAMS)
	@test "$(HAVE_PCRE2)" = 1 || echo "skipped build/prepare: PCRE2 headers missing (apt-get install libpcre2-dev, or run 'make deps' as root)"
	@test "$(HAVE_NVCC)" = 1 || echo "built without CUDA: nvcc not found (install the CUDA toolkit; --device cuda will say so)"

# ---- Debian packages: installed when we are root and a package registry answers; otherwise the
# exact command is printed. Only what the asked-for target needs is required (a GPU machine
# without PCRE2 still builds and trains on a prepared corpus).
define ensure_packages
	@missing=""; \
	for pair in $(1); do hdr=$${pair%%:*}; pkg=$${pair##*:}; \
	  [ -e "$$hdr" ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq $$missing) >/dev/null 2>&1 || \
	      { echo "error: could not install$$missing; run: sudo apt-get install -y$$missing"; exit 1; }; \
	  else echo "error: missing packages; run: sudo apt-get install -y$$missing"; exit 1; fi; \
	fi
endef
PKG_BUILD := /usr/include/nlohmann:nlohmann-json3-dev /usr/include/CLI:libcli11-dev
PKG_TEST  := /usr/include/gtest:libgtest-dev /usr/include/pcre2.h:libpcre2-dev
PKG_DATA  := /usr/include/pcre2.h:libpcre2-dev
deps:
	$(call ensure_packages,$(PKG_BUILD) $(PKG_TEST))
deps-build:
	$(call ensure_packages,$(PKG_BUILD))
deps-data:
	$(call ensure_packages,$(PKG_BUILD) $(PKG_DATA))

# ---- objects
$(BUILD)/obj/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@
# Objects that use Hopper's warpgroup MMA (cuda/attention/wgmma.cuh) are built for sm_90a only
# (wgmma and setmaxnreg exist only there; the header refuses any other target). Their code runs
# on compute capability 9.x alone, so their callers check the GPU first (the tests skip elsewhere).
WGMMA_OBJ := $(BUILD)/obj/tests/gpu/test_wgmma_gpu.o $(BUILD)/obj/cuda/attention/flash_wgmma.o
$(WGMMA_OBJ): GENCODE = -gencode=arch=compute_90a,code=sm_90a
ifeq ($(HAVE_MPI),1)
$(MPI_OBJ): src/launch_mpi.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(shell mpicxx --showme:compile 2>/dev/null || mpicxx -compile_info 2>/dev/null | cut -d' ' -f2-) -c $< -o $@
endif
$(BUILD)/obj/backend/cuda_stub.o: src/backend/cuda_stub.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/libcore.a: $(CORE_OBJ)
	@mkdir -p $(BUILD)
	rm -f $@ && ar rcs $@ $^

# ---- programs
$(BUILD)/train: $(BUILD)/obj/train/train.o $(MPI_OBJ) $(BACKEND_OBJ) $(BUILD)/libcore.a
	$(CXX) $^ -o $@ $(LDFLAGS) $(BACKEND_LIBS) $(MPI_LIBS)
$(BUILD)/attn: $(BUILD)/obj/train/attn.o $(BACKEND_OBJ) $(BUILD)/libcore.a
	$(CXX) $^ -o $@ $(LDFLAGS) $(BACKEND_LIBS)
$(BUILD)/prepare: $(BUILD)/obj/data/prepare.o $(PRETOK_OBJ) $(BUILD)/libcore.a
	$(CXX) $^ -o $@ $(LDFLAGS) -lpcre2-8

UNIT_OBJ := $(UNIT_SRC:%.cpp=$(BUILD)/obj/%.o)
$(BUILD)/test_unit: $(UNIT_OBJ) $(PRETOK_OBJ) $(BUILD)/libcore.a $(BUILD)/obj/backend/cuda_stub.o
	$(CXX) $^ -o $@ $(LDFLAGS) -lgtest -lgtest_main -lpcre2-8

GPU_OBJ := $(patsubst %.cu,$(BUILD)/obj/%.o,$(patsubst %.cpp,$(BUILD)/obj/%.o,$(GPU_SRC)))
$(BUILD)/test_gpu: $(GPU_OBJ) $(BACKEND_OBJ) $(BUILD)/libcore.a
	$(CXX) $^ -o $@ $(LDFLAGS) $(BACKEND_LIBS) -lgtest -lgtest_main

# benchmarks: each tests/bench/NAME.cu is one program build/bench/NAME
# CUDA objects come before libcore.a: they use its CPU helpers (e.g. performer_features)
$(BUILD)/bench/%: $(BUILD)/obj/tests/bench/%.o $(BACKEND_OBJ) $(BUILD)/libcore.a
	@mkdir -p $(dir $@)
	$(CXX) $^ -o $@ $(LDFLAGS) $(BACKEND_LIBS)

# ---- top-level commands
# test: the CPU suite; the GPU suite is compiled too (not run) so a CUDA build break shows in CI.
TOKENIZER ?= $(HOME)/.cache/gpt-framework/gpt2-tokenizer
test: deps
	@$(MAKE) --no-print-directory -j$(JOBS) $(BUILD)/test_unit $(PROGRAMS) $(if $(HAVE_NVCC),$(BUILD)/test_gpu)
	./data/fetch_tokenizer.sh $(TOKENIZER)
	TOKENIZER_DIR=$(TOKENIZER) ./tests/run_unit.sh $(BUILD)/test_unit

test-gpu: $(BUILD)/test_gpu
	$(BUILD)/test_gpu

# the corpus is fetched and tokenized once; a prepared folder (DONE marker) is reused as is
data:
	@if [ -f "$(DATA)/DONE" ]; then echo "data: using $(DATA)"; else \
	  $(MAKE) --no-print-directory deps-data && $(MAKE) --no-print-directory -j$(JOBS) $(BUILD)/prepare && \
	  ./data/fetch_corpus.sh $(DATA); fi

train: data deps-build
	@$(MAKE) --no-print-directory -j$(JOBS) $(BUILD)/train
	$(BUILD)/train --data $(DATA) --out $(OUT) $(ARGS)

plot:
	$(call ensure_packages,/usr/bin/gnuplot:gnuplot-nox)
	./train/plot.sh $(RUN)/log.jsonl $(RUN)/curves.png

bench: all
	./tests/bench/run.sh

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
