#!/usr/bin/env python3
"""A Modbus TCP device for the bridge test, served by pymodbus (not our code).

    python3 modbus_server.py PORT

Unit 1. Holding registers: 0-1 = f32 21.5 (high word first), 2 = u16 1234, 3 = i16 -7,
4-5 = f32 NaN (a sensor's fault value), 10 = 0 (the bridge's `stop` command writes it). Input registers: 0-1 = u32 65538 with the
low word first. Coil 0 = on. Registers past 19 do not exist (reading them is an exception).
Prints "ready" once listening.
"""
import asyncio
import sys

from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import StartAsyncTcpServer


async def main(port):
    # pymodbus addresses a block from 1: block address 1 is wire address 0.
    hr = ModbusSequentialDataBlock(1, [0x41AC, 0x0000, 1234, 0xFFF9, 0x7FC0, 0x0000] + [0] * 14)
    ir = ModbusSequentialDataBlock(1, [0x0002, 0x0001] + [0] * 8)
    co = ModbusSequentialDataBlock(1, [1] + [0] * 7)
    di = ModbusSequentialDataBlock(1, [0] * 8)
    context = ModbusServerContext(devices=ModbusDeviceContext(di=di, co=co, hr=hr, ir=ir), single=True)
    server = StartAsyncTcpServer(context=context, address=("127.0.0.1", port))
    task = asyncio.ensure_future(server)
    await asyncio.sleep(0.5)
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
