"""The one compiled part: the udp fast path's segmentation and coalescing
(netemu/overlay/_vnetc.c). Optional: without a C compiler the package installs
and the fast path uses its numpy code instead (slower; `netemu describe node`
says which one runs). Everything else is in setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("netemu.overlay._vnetc", ["netemu/overlay/_vnetc.c"],
                             depends=["netemu/overlay/vnet_core.h"],
                             extra_compile_args=["-O3", "-Wall"], optional=True)])
