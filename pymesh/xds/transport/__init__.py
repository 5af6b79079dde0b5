"""The xDS client's only grpcio code: channels to xDS servers and the ADS stream."""

from __future__ import annotations

from pymesh.xds.transport.ads_stream import DELTA_METHOD, SOTW_METHOD, AdsStream, ChannelProbe
from pymesh.xds.transport.channel import create_channel

__all__ = ["DELTA_METHOD", "SOTW_METHOD", "AdsStream", "ChannelProbe", "create_channel"]
