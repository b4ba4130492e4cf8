#!/usr/bin/env python3
"""A lab BMC on pyghmi's BMC server (pyghmi.ipmi.bmc.Bmc, the base of OpenStack's VirtualBMC).

RMCP+ only (cipher suite 3), bound to the address given (127.0.0.1 in the tests; pyghmi's own
fakebmc binds every address). Power state and boot device live in files in STATE_DIR, as
VirtualBMC keeps them in the hypervisor, so they survive a restart of the BMC; the boot device is
all it keeps of a boot override (no persistence, no EFI flag), as VirtualBMC. Every change the
BMC is asked for is appended to STATE_DIR/actions.log, so a test can see exactly what the BMC
did. It prints "ready <port>" on stdout once listening.

Usage: pyghmi-bmc.py ADDRESS PORT USER PASSWORD STATE_DIR
"""

import os
import sys
import time

import pyghmi.ipmi.bmc as bmc


class LabBmc(bmc.Bmc):
    def __init__(self, authdata, port, address, state_dir):
        super().__init__(authdata, port=port, address=address)
        self.state_dir = state_dir

    def _path(self, name):
        return os.path.join(self.state_dir, name)

    def _get(self, name, default):
        try:
            with open(self._path(name)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return default

    def _set(self, name, value):
        with open(self._path(name), 'w') as f:
            f.write(value + '\n')
        with open(self._path('actions.log'), 'a') as f:
            f.write('%.6f set %s %s\n' % (time.time(), name, value))

    def get_power_state(self):
        return self._get('power', 'off')

    def power_on(self):
        self._set('power', 'on')

    def power_off(self):
        self._set('power', 'off')

    def power_cycle(self):
        self._set('power', 'on')

    def power_reset(self):
        with open(self._path('actions.log'), 'a') as f:
            f.write('%.6f set reset\n' % time.time())
        self._set('power', 'on')

    def power_shutdown(self):
        with open(self._path('actions.log'), 'a') as f:
            f.write('%.6f set shutdown\n' % time.time())
        self._set('power', 'off')

    def get_boot_device(self):
        return self._get('boot', 'default')

    def set_boot_device(self, bootdevice):
        self._set('boot', bootdevice)


def main():
    address, port, user, password, state_dir = sys.argv[1:6]
    os.makedirs(state_dir, exist_ok=True)
    me = LabBmc({user: password}, int(port), address, state_dir)
    print('ready %s' % port, flush=True)
    me.listen(timeout=30)


if __name__ == '__main__':
    main()
