from setuptools import find_packages, setup

setup(
    name="torchblocks",
    version="0.1.0",
    description="The mathematical building blocks of neural networks, hand-written for PyTorch: "
    "autograd Functions with hand-derived backward passes, Triton kernels and a CPU fallback.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is device code only; it installs as torchblocks.kernels so that
    # nothing named plain `kernels` lands in site-packages.
    packages=find_packages(include=["torchblocks", "torchblocks.*"]) + ["torchblocks.kernels"],
    package_dir={"torchblocks.kernels": "kernels"},
    # The embedded stand-in for MNIST: four small gzipped IDX files. The
    # compiled eager CPU path's sources, built on first use (torch.utils.cpp_extension).
    package_data={"torchblocks.cli.data": ["digits/*.gz", "digits/README.md"],
                  "torchblocks._ops": ["eager_cpu.cpp", "optim_cpu.cpp", "optim_cpu.h", "watched.h"]},
    # The lower bounds are the oldest versions tested (scripts/test.sh --oldest
    # installs exactly these); README.md "Tested versions" has the range.
    install_requires=[
        "torch>=2.11",
        "numpy",
        "ninja",  # torch.utils.cpp_extension builds with it
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    # hf: torchblocks.hf and patch()'s Hugging Face path; the tests run it, and
    # build wheels without build isolation (setuptools has bdist_wheel from 70.1)
    extras_require={"plot": ["matplotlib"], "hf": ["transformers>=4.46"],
                    "test": ["pytest", "pytest-xdist", "matplotlib", "transformers>=4.46",
                             "setuptools>=70.1"]},
    entry_points={"console_scripts": ["torchblocks = torchblocks.cli:main"]},
)
