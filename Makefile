# The two commands a newcomer needs:  make demo  (the embedded demo workflow)  and  make test.
# Each creates the Python environment in .venv/ first if it is missing.
VENV   := .venv
CORES  ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: demo showcase test lint dryrun-paper dryrun-slurm clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	snakemake --cores $(CORES) --rerun-incomplete
	@echo "open results/report.html"

# everything a reader should see (SimCLR, every protocol x 3 label fractions x 2 seeds, fusion, folds, 3-D OCT):
# about 7,800 job-seconds (65 min on 2 cores shared with a CI run, 2026-12-06)
showcase: $(VENV)/.installed
	snakemake --cores $(CORES) --rerun-incomplete --configfile config/showcase.yaml
	@echo "open results/report.html"

test: $(VENV)/.installed
	pytest -q

lint: $(VENV)/.installed
	snakemake --lint

dryrun-paper: $(VENV)/.installed
	snakemake -n --configfile config/retfound_paper.yaml --config missing_data=warn

# what each paper-scale job would ask SLURM for (profiles/slurm, via the ./slurm link; its
# `cores:` keeps a dry-run from listing every job with threads 1)
dryrun-slurm: $(VENV)/.installed
	snakemake -n --profile slurm --configfile config/retfound_paper.yaml --config missing_data=warn

clean:
	rm -rf results logs benchmarks .snakemake
