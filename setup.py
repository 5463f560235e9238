from setuptools import find_packages, setup

setup(
    name="peft-sparse",
    version="0.1.0",
    description="Sparse fine-tuning (SpIEL, qSpIEL, LT-SFT) as Hugging Face PEFT tuners",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"peft_sparse": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "peft>=0.21",
        "transformers>=4.56",
        "accelerate",
        "safetensors",
        "bitsandbytes",
        "aenum",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest", "trl", "matplotlib"],
        "examples": ["matplotlib"],
    },
)
