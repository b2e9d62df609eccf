"""ankh3_jax: pre-train, fine-tune and serve Ankh3 protein language models in JAX/Flax."""
import setuptools

# Runtime pins: the known-good stack (see requirements/lock.txt for the full lock).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "tensorboard==2.21.0",
    "sentencepiece==0.2.3",
    "gin-config==0.5.0",
    "clu==0.0.12",
    "numpy==2.4.6",
    "h5py==3.14.0",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "protobuf==7.36.2",
    "ml_dtypes==0.6.0",
    "safetensors==0.8.0",
]

EXTRAS_REQUIRE = {
    # Parity with the released (PyTorch) format. Install torch==2.13.0 first: a CPU wheel.
    "parity": ["torch==2.13.0", "transformers==5.24.0"],
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.17"],
}

setuptools.setup(
    name="ankh3_jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The top-level tasks/ and gin_configs/ install as ankh3_jax.tasks / ankh3_jax.gin_configs.
    packages=(setuptools.find_packages(include=["ankh3_jax", "ankh3_jax.*"])
              + ["ankh3_jax.tasks", "ankh3_jax.gin_configs"]),
    package_dir={"ankh3_jax.tasks": "tasks", "ankh3_jax.gin_configs": "gin_configs"},
    package_data={"ankh3_jax": ["assets/*", "assets/*/*", "csrc/*.cc"],
                  "ankh3_jax.gin_configs": ["*/*.gin"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "ankh3-train=ankh3_jax.main:main",
            "ankh3-convert=ankh3_jax.convert:main",
            "ankh3-params=ankh3_jax.param_count:main",
            "ankh3-embed=ankh3_jax.embed:main",
            "ankh3-complete=ankh3_jax.complete:main",
            "ankh3-ablation=ankh3_jax.ablation.run:main",
            "ankh3-finetune=ankh3_jax.downstream.cli:main",
        ],
    },
)
