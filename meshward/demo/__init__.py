"""The local mesh: demo services, the topology as processes on 127.0.0.1, the scripted tour."""
