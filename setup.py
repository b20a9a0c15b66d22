"""The compiled parts of the udp fast path, both optional: without a C compiler
the package installs, and the udp backend runs its Python workers with numpy
(slower; `netemu describe node` says which one runs). Everything else is in
setup.cfg.

- netemu.overlay._vnetc (netemu/overlay/_vnetc.c): the per-byte work
  (segmenting, coalescing, checks) for the Python workers and vnet.py;
- netemu/overlay/fastudp-worker (netemu/overlay/fastudp_worker.c): the whole
  worker compiled, an executable built next to the helper (in place for an
  editable install), sharing the helper's vnet_core.h.

And, optional as well, netemu/node/netemu-pause (netemu/node/pause.c): the pod
sandbox's pause process in one exec (without it, a shell chain does its work)."""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CORE = "netemu/overlay/vnet_core.h"
WORKER = "netemu/overlay/fastudp_worker.c"
PAUSE = "netemu/node/pause.c"


class BuildExtAndWorker(build_ext):
    """build_ext, then the worker executable with the same compiler. A failure
    leaves it out (the Python worker runs), with a warning."""

    def run(self):
        super().run()
        out = os.path.dirname(self.get_ext_fullpath("netemu.overlay._vnetc"))
        try:
            objects = self.compiler.compile([WORKER], output_dir=self.build_temp, depends=[CORE],
                                            extra_postargs=["-O2", "-Wall"])
            self.compiler.link_executable(objects, "fastudp-worker", output_dir=out, libraries=["pthread"])
        except Exception as error:          # distutils' CompileError/LinkError, or no compiler at all
            self.warn(f"the compiled udp worker was not built ({error}): the Python worker will run")
        try:
            objects = self.compiler.compile([PAUSE], output_dir=self.build_temp, extra_postargs=["-O2", "-Wall"])
            self.compiler.link_executable(objects, "netemu-pause", output_dir=os.path.join(os.path.dirname(out), "node"))
        except Exception as error:
            self.warn(f"the compiled pause was not built ({error}): a shell chain does its work")


setup(ext_modules=[Extension("netemu.overlay._vnetc", ["netemu/overlay/_vnetc.c"], depends=[CORE],
                             extra_compile_args=["-O3", "-Wall"], optional=True)],
      cmdclass={"build_ext": BuildExtAndWorker})
