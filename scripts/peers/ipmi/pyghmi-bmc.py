#!/usr/bin/env python3
"""A lab BMC on pyghmi's BMC server (pyghmi.ipmi.bmc.Bmc, the base of OpenStack's VirtualBMC).

RMCP+ only (cipher suite 3), bound to the address given (127.0.0.1 in the tests; pyghmi's own
fakebmc binds every address). Power state and boot device live in files in STATE_DIR, as
VirtualBMC keeps them in the hypervisor, so they survive a restart of the BMC; the boot device is
all it keeps of a boot override (no persistence, no EFI flag), as VirtualBMC. Every change the
BMC is asked for is appended to STATE_DIR/actions.log, so a test can see exactly what the BMC
did. It prints "ready <port>" on stdout once listening.

With --cipher-suite-17 it also offers RMCP+ cipher suite 17 (RAKP-HMAC-SHA256, HMAC-SHA256-128,
AES-CBC-128), which pyghmi's server lacks (its client has it): the RAKP codes, the SIK and K1/K2
are computed with HMAC-SHA256, as pyghmi's client computes them (K1/K2 over 20-byte constants),
and the session's integrity uses pyghmi's own SHA-256 packet code. Get Channel Cipher Suites then
lists suites 3 and 17. No packaged BMC offers suite 17; ipmitool -C 17 is the independent check
of this extension.

Usage: pyghmi-bmc.py ADDRESS PORT USER PASSWORD STATE_DIR [--cipher-suite-17]
"""

import hashlib
import hmac
import os
import struct
import sys
import time

import pyghmi.ipmi.bmc as bmc
import pyghmi.ipmi.private.constants as constants
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmisession


class Suite17Session(serversession.ServerSession):
    """pyghmi's server session, with cipher suite 17 when the console proposes it."""

    def create_open_session_response(self, request):
        # Request: tag, privilege, reserved, console session id, then the authentication,
        # integrity and confidentiality payloads (algorithm at offsets 12, 20, 28).
        sha256 = request[12] == 3 and request[20] == 4
        self.currhashlib = hashlib.sha256 if sha256 else hashlib.sha1
        self.currhashlen = 16 if sha256 else 12
        response = super().create_open_session_response(request)
        if sha256:
            response[16] = 3
            response[24] = 4
        return response

    def _got_rakp1(self, data):
        if self.currhashlib is hashlib.sha1:
            return super()._got_rakp1(data)
        clienttag = data[0]
        self.Rm = data[8:24]
        self.rolem = data[24]
        self.maxpriv = self.rolem & 0b111
        if data[27] == 0:
            return
        self.username = bytes(data[28:])
        password = self.authdata.get(self.username.decode('utf-8'))
        if password is None:
            return
        self.uuiddata = self.uuid.bytes
        self.Rc = os.urandom(16)
        hmacdata = (self.clientsessionid + self.managedsessionid + self.Rm
                    + self.Rc + self.uuiddata
                    + bytearray([self.rolem, len(self.username)]))
        hmacdata += self.username
        self.kuid = password.encode('utf-8')
        if self.kg is None:
            self.kg = self.kuid
        authcode = hmac.new(self.kuid, bytes(hmacdata), hashlib.sha256).digest()
        newmessage = (bytearray([clienttag, 0, 0, 0]) + self.clientsessionid
                      + self.Rc + self.uuiddata + authcode)
        self.send_payload(newmessage, constants.payload_types['rakp2'],
                          retry=False)

    def _got_rakp3(self, data):
        if self.currhashlib is hashlib.sha1:
            return super()._got_rakp3(data)
        h = hashlib.sha256
        names = struct.pack("2B", self.rolem, len(self.username)) + self.username
        self.sik = hmac.new(self.kg, bytes(self.Rm + self.Rc) + names, h).digest()
        self.k1 = hmac.new(self.sik, b'\x01' * 20, h).digest()
        self.k2 = hmac.new(self.sik, b'\x02' * 20, h).digest()
        self.aeskey = self.k2[0:16]
        expected = hmac.new(self.kuid, bytes(self.Rc + self.clientsessionid) + names,
                            h).digest()
        if expected != bytes(data[8:]) or data[1] != 0:
            return
        self.localsid = struct.unpack('<I', self.managedsessionid)[0]
        self.ipmicallback = self.handle_client_request
        self._send_rakp4(data[0], 0)

    def _send_rakp4(self, tagvalue, statuscode):
        if self.currhashlib is hashlib.sha1:
            return super()._send_rakp4(tagvalue, statuscode)
        payload = bytearray([tagvalue, statuscode, 0, 0]) + self.clientsessionid
        icvdata = bytes(self.Rm + self.managedsessionid + self.uuiddata)
        payload += hmac.new(self.sik, icvdata, hashlib.sha256).digest()[:16]
        self.send_payload(payload, constants.payload_types['rakp4'], retry=False)
        self.confalgo = 'aes'
        self.integrityalgo = 'sha256'
        self.sequencenumber = 1
        self.sessionid = struct.unpack(
            '<I', struct.pack('4B', *self.clientsessionid))[0]


class LabBmc(bmc.Bmc):
    def __init__(self, authdata, port, address, state_dir, suite17=False):
        super().__init__(authdata, port=port, address=address)
        self.state_dir = state_dir
        self.suite17 = suite17

    def send_cipher_suites(self, myaddr, mylun, clientaddr, clientlun,
                           clientseq, data, sockaddr):
        if not self.suite17:
            return super().send_cipher_suites(myaddr, mylun, clientaddr, clientlun,
                                              clientseq, data, sockaddr)
        # Completion 0, channel 1, records for suite 3 and suite 17 (one page).
        body = bytearray(b'\x00\x01\xc0\x03\x01\x41\x81\xc0\x11\x03\x44\x81')
        ipmihdr = bytearray([clientaddr, clientlun | (7 << 2)])
        ipmihdr.append(ipmisession._checksum(*ipmihdr))
        rs = bytearray([myaddr, mylun | clientseq << 2, 0x54]) + body
        rs.append(ipmisession._checksum(*rs))
        msg = ipmihdr + rs
        pkt = (bytearray(b'\x06\x00\xff\x07\x06\x00\x00\x00\x00\x00\x00\x00\x00\x00')
               + struct.pack('<H', len(msg)) + msg)
        ipmisession._io_sendto(self.serversocket, pkt, sockaddr)

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
    suite17 = '--cipher-suite-17' in sys.argv[6:]
    if suite17:
        serversession.ServerSession = Suite17Session
    os.makedirs(state_dir, exist_ok=True)
    me = LabBmc({user: password}, int(port), address, state_dir, suite17)
    print('ready %s' % port, flush=True)
    me.listen(timeout=30)


if __name__ == '__main__':
    main()
