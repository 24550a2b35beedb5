# Everyday targets. Each one goes through dev.py, which needs only Python and pip.
PY := .venv/bin/python

.PHONY: up test setup lint bench train-demo sample
up:            ## set up and start the whole local stack on http://127.0.0.1:8000
	python3 dev.py up
test:          ## set up and run the tests
	python3 dev.py test
setup:
	python3 dev.py setup
lint: setup
	$(PY) -m ruff check undiffuse service tests bench
	$(PY) -m ruff format --check undiffuse service tests bench
bench: setup   ## the sampler and service benchmarks (see docs/benchmarks.md)
	$(PY) bench/sampler.py
	$(PY) bench/service.py
MNIST := --data ../shared/datasets/mnist/t10k-images-idx3-ubyte.gz --labels ../shared/datasets/mnist/t10k-labels-idx1-ubyte.gz
train-demo: setup   ## retrain the demo model (docs/training.md: stages 1, 2, 4 and 5)
	$(PY) -m undiffuse.cli train $(MNIST) --out runs/mnist --steps 6000 --lr 8e-4 --checkpoint-every 500
	$(PY) -m undiffuse.cli train $(MNIST) --out runs/mnist --steps 7000 --lr 4e-4 --checkpoint-every 500
	$(PY) -m undiffuse.cli train $(MNIST) --out runs/mnist --steps 13000 --lr 6e-4 --lr-decay cosine \
	  --guidance-interval 0.28,5.42 --checkpoint-every 1000
	$(PY) -m undiffuse.cli train $(MNIST) --out runs/mnist --steps 23000 --lr 6e-4 --lr-decay cosine \
	  --guidance-interval 0.28,5.42 --checkpoint-every 1000 --mixed-precision bf16
sample: setup
	$(PY) -m undiffuse.cli sample --model-dir models/mnist --num 100 --nrow 10 --steps 50 --seed 0 --out grid.png
