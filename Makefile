# The two set-up commands of the README:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision first, pinned to the builds CI uses (CUDA wheels on x86-64 Linux, also fine on a CPU);
# override on a GPU box whose driver wants another build:  make demo TORCH="torch==X torchvision==Y"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# NVIDIA DALI's build for the driver's CUDA major (nvidia-smi's "CUDA Version"): dali-cu12 or dali-cu13
DALI   ?= dali-cu12
DEMO   ?= demo
# SkyPilot pins click<8.2, which breaks huggingface_hub's CLI: it lives in a venv of its own, used by the
# tests only to parse deploy/aws/*.yaml with SkyPilot's own loader.
SKY    ?= .venv-sky

.PHONY: install demo test clean-demo mutation

$(SKY)/bin/.installed:
	$(PYTHON) -m venv $(SKY)
	$(SKY)/bin/pip install -q 'skypilot>=0.14'
	touch $@

# What the demo needs (the package and its runtime requirements) ...
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[$(DALI)]'
	touch $@

# ... and what only the tests need on top (pytest, moto, selenium, onnx/onnxruntime for the export test).
$(BIN)/.installed-dev: $(BIN)/.installed setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[dev,$(DALI)]'
	touch $@

install: $(BIN)/.installed

# Synthetic ImageNet-schema parquet -> WebDataset shards -> ResNet-50 training on the CPU (a few minutes on
# 2 cores) -> top-1 -> Grad-CAM grid of the most confident mistakes + training curves. Re-running resumes a
# stopped run and keeps a finished one.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m preprocess.synthetic --out $(DEMO)/parquet
	HF_HUB_OFFLINE=1 $(BIN)/python -m preprocess.shard --src $(DEMO)/parquet --out $(DEMO)/shards --images-per-shard 250
	@# a finished run is never trained over (train.main refuses it): a re-run keeps it and redraws the figures
	@if grep -qs '"state": "finished"' $(DEMO)/run/run.json; then \
		echo "$(DEMO)/run finished earlier: kept as it is (make clean-demo, then make demo, to train it again)"; \
	else $(BIN)/python -m train.main --data $(DEMO)/shards --out $(DEMO)/run --config smoke; fi
	$(BIN)/python -m viz.gradcam --checkpoint $(DEMO)/run/checkpoints/best.pt --data $(DEMO)/shards \
		--output $(DEMO)/gradcam.png --num-show 6
	$(BIN)/python -m viz.plots $(DEMO)/run --output $(DEMO)/curves.png
	$(BIN)/python -m viz.report $(DEMO)/run --data $(DEMO)/shards --output $(DEMO)/report

test: $(BIN)/.installed-dev $(SKY)/bin/.installed
	HF_HUB_OFFLINE=1 SKYPILOT_PYTHON=$(abspath $(SKY))/bin/python $(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO)

# Mutation testing (not in CI: minutes to tens of minutes per module on 2 cores). mutmut 3 mutates a copy of
# the committed tree (git archive HEAD into $(MUTATION_DIR)/<name>/; the checkout is never touched), runs the
# module's fast tests against every mutant and prints killed / survived; docs/TESTING.md holds the scores and
# the survivors judged equivalent. One module:  make mutation MUTATE=schedule
# MUTANTS_<name> = the module to mutate, then the tests (files or node ids) that may kill its mutants.
MUTATION_DIR ?= build/mutation
MUTATE       ?= schedule model checkpoint datasets evaluate engine manifest
MUTANTS_schedule   = train/schedule.py tests/test_schedule.py
MUTANTS_model      = train/model.py tests/test_recipe.py tests/test_model_step.py
MUTANTS_checkpoint = train/checkpoint.py tests/test_recipe_checkpoint.py \
	tests/test_checkpoint.py::test_save_atomic_leaves_no_partial_file \
	tests/test_checkpoint.py::test_stop_signals_set_a_flag_and_restore_the_handlers \
	tests/test_checkpoint.py::test_rng_state_round_trips_through_weights_only
MUTANTS_datasets   = viz/datasets.py tests/test_recipe_datasets.py tests/test_label_space.py \
	$(addprefix tests/test_gradcam.py::test_,tiny_imagenet_val_maps_to_imagenet_classes \
	tiny_imagenet_labels_are_the_imagenet_indices_of_their_wnids imagefolder_labels_are_the_imagenet_indices_of_their_wnids \
	imagefolder_uses_the_train_class_list unknown_layout_is_an_error class_count_of_checkpoint_and_data_must_agree \
	flip_averaging_uses_the_mirror)
MUTANTS_evaluate   = viz/evaluate.py tests/test_recipe_evaluate.py tests/test_viz_top5.py \
	tests/test_gradcam.py::test_flip_averaging_uses_the_mirror
MUTANTS_engine     = train/engine.py tests/test_recipe_engine.py tests/test_recipe.py tests/test_model_step.py
MUTANTS_manifest   = preprocess/manifest.py tests/test_recipe_datasets.py \
	$(addprefix tests/test_shard_order.py::test_,label_sorted_parquet_gives_mixed_shards \
	manifest_reports_the_order_and_the_mix allow_unshuffled_trains_anyway_with_a_warning \
	unknown_mix_is_refused_with_the_reason) \
	$(addprefix tests/test_data.py::test_,missing_shard_is_named corrupt_shard_gives_an_error_naming_it \
	errors_for_bad_arguments)

mutation: $(addprefix mutation-,$(MUTATE))

mutation-%: | $(BIN)/.installed-dev
	@test -n "$(MUTANTS_$*)" || { echo "make mutation: no MUTANTS_$* (known: $(MUTATE))"; exit 2; }
	$(BIN)/pip install -q 'mutmut>=3.8,<4'
	rm -rf $(MUTATION_DIR)/$* && mkdir -p $(MUTATION_DIR)/$*
	git archive HEAD | tar -x -C $(MUTATION_DIR)/$* && git rev-parse --short HEAD > $(MUTATION_DIR)/$*/COMMIT
	printf '%s\n' '' '[mutmut]' 'source_paths =' '    train' '    viz' '    preprocess' 'also_copy =' '    benchmarks' \
		'only_mutate = $(firstword $(MUTANTS_$*))' 'pytest_add_cli_args_test_selection =' \
		 $(patsubst %,'    %',$(wordlist 2,99,$(MUTANTS_$*))) \
		'process_isolation = forkserver' >> $(MUTATION_DIR)/$*/setup.cfg
	cd $(MUTATION_DIR)/$* && HF_HUB_OFFLINE=1 $(abspath $(BIN))/mutmut run --max-children $(or $(JOBS),1)
	cd $(MUTATION_DIR)/$* && $(abspath $(BIN))/mutmut export-cicd-stats && $(abspath $(BIN))/mutmut results --all true \
		| tee results.txt | grep -v ': killed$$' || true
	@echo "$* ($(firstword $(MUTANTS_$*))) at $$(cat $(MUTATION_DIR)/$*/COMMIT): $$(cat $(MUTATION_DIR)/$*/mutants/mutmut-cicd-stats.json)"
