# Two commands for a fresh Debian/Ubuntu machine with Python 3.11:
#   make run   - set up .venv and start the main job
#   make test  - set up .venv and the Debian tools the tests need, run every test
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_STAMP := /var/tmp/myeloma-ct-debs.installed
DEB_PACKAGES := orthanc orthanc-dicomweb dicom3tools chromium openssl

export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: run test venv debs lint demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) requirements.txt requirements-edge.txt requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# Debian packages used by integration tests (Orthanc + DICOMweb, dciodvfy, Chromium).
debs:
	@if [ ! -f $(DEB_STAMP) ] || ! command -v dciodvfy >/dev/null || ! command -v Orthanc >/dev/null || ! command -v chromium >/dev/null || ! command -v openssl >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEB_PACKAGES) >/dev/null && \
		touch $(DEB_STAMP) 2>/dev/null || true; \
	fi

run: venv
	$(PY) -m app.launch

demo: venv
	$(PY) -m model_zoo.phantoms build/demo --studies 4 --seed 1 --montage docs/phantom_montage.png

test: venv debs
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf build .pytest_cache
