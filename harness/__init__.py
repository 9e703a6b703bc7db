"""Code that starts both roles on one host: a local federation, the demo, simulation, the evaluation
pipeline and the emulator sweep, splitting a task among data owners. The only package that may import
both ``offsite.client`` and ``offsite.cloud``; nothing imports it but the command line and tests."""
