package ferry

import java.util.concurrent.TimeUnit

import org.apache.spark.sql.{Encoders, Row}
import org.apache.spark.sql.execution.streaming.runtime.MemoryStream
import org.apache.spark.sql.functions.{col, lit}
import org.apache.spark.sql.types._
import org.scalatest.funsuite.AnyFunSuite

class PythonStageSuite extends AnyFunSuite with SparkSuite {

  private def conf = FerryConf.get(spark)
  private def pool = WorkerPool.get(conf)

  private def rootCause(t: Throwable): FerryException =
    FerryException.find(t).getOrElse(fail(s"no FerryException in the cause chain of $t", t))

  test("ListStages and Describe come from the worker") {
    val names = pool.withClient(_.listStages().map(_.getName))
    assert(Set("convolve", "identity", "scale", "raise_error").subsetOf(names.toSet), names)
    val d = pool.withClient(_.describe("scale", """{"factor": 2}""", Some(StructType(Seq(StructField("x", DoubleType))))))
    assert(d.outputSchema.get.fieldNames.toSeq == Seq("y"))
    assert(d.outputSchema.get("y").dataType == DoubleType)
    assert(d.spec.getParamsList.size() == 1 && d.spec.getParams(0).getName == "factor")
    assert(Json.decodeObject(d.paramsJson).get("factor").asInstanceOf[Number].doubleValue() == 2.0)
    val specOnly = pool.withClient(_.describe("convolve"))
    assert(specOnly.outputSchema.isEmpty)
    assert(specOnly.spec.getParamsList.size() >= 4)
  }

  test("identity round trip of many column types, nulls included, over several partitions") {
    val schema = StructType(Seq(
      StructField("l", LongType), StructField("i", IntegerType), StructField("d", DoubleType),
      StructField("f", FloatType), StructField("b", BooleanType), StructField("s", StringType),
      StructField("bin", BinaryType), StructField("af", ArrayType(FloatType)), StructField("ad", ArrayType(DoubleType)),
      StructField("sh", ShortType), StructField("by", ByteType)))
    val rows = (0 until 500).map { k =>
      if (k % 97 == 5) Row(k.toLong, null, null, null, null, null, null, null, null, null, null)
      else Row(k.toLong, k * 3, k * 0.5, k.toFloat / 3, k % 2 == 0, s"row-$k-\u00e9\u4e2d", Array[Byte](k.toByte, 1, 2),
        Seq.tabulate(k % 4)(j => (j + k).toFloat), if (k % 7 == 0) Seq() else Seq(k.toDouble, Double.NaN, -1.5),
        (k % 300).toShort, (k % 100).toByte)
    }
    val df = spark.createDataFrame(spark.sparkContext.parallelize(rows, 3), schema)
    val out = new PythonStage().setStageName("identity").transform(df)
    assert(out.schema.fieldNames.toSeq == schema.fieldNames.toSeq)
    assert(out.schema.map(_.dataType) == schema.map(_.dataType))
    val got = out.collect().sortBy(_.getLong(0))
    assert(got.length == rows.length)
    got.zip(rows).foreach { case (g, e) =>
      (0 until schema.length).foreach { c =>
        (g.get(c), e.get(c)) match {
          case (a: Array[Byte], b: Array[Byte]) => assert(a.toSeq == b.toSeq)
          case (a: collection.Seq[_], b: collection.Seq[_]) =>
            assert(a.map(_.toString) == b.map(_.toString), s"row ${e.getLong(0)} col ${schema(c).name}")
          case (a, b) => assert(a == b, s"row ${e.getLong(0)} col ${schema(c).name}")
        }
      }
    }
    // inputCols picks and orders columns.
    val picked = new PythonStage().setStageName("identity").setInputCols(Array("s", "l")).transform(df)
    assert(picked.schema.fieldNames.toSeq == Seq("s", "l"))
    assert(picked.count() == 500)
  }

  test("scale with params, as a map and as JSON") {
    val df = spark.range(0, 1000, 1, 4).select(col("id").cast(DoubleType).as("x"), lit("ignored").as("other"))
    val stage = new PythonStage().setStageName("scale").setParams(Map("factor" -> 2.5)).setInputCols(Array("x"))
    assert(stage.transformSchema(df.schema) == StructType(Seq(StructField("y", DoubleType, nullable = true))))
    val ys = stage.transform(df).collect().map(_.getDouble(0)).sorted
    assert(ys.toSeq == (0 until 1000).map(_ * 2.5))
    val viaJson = new PythonStage().setStageName("scale").setParamsJson("""{"factor": -1}""")
      .setInputCols(Array("x")).transform(df).agg(org.apache.spark.sql.functions.sum("y")).head().getDouble(0)
    assert(viaJson == -(0 until 1000).sum.toDouble)
  }

  test("transform runs no job, even over a shuffle under adaptive execution; the action runs it once") {
    Seq("true", "false").foreach { aqe =>
      withConf("spark.sql.adaptive.enabled" -> aqe) {
        val df = spark.range(0, 1000, 1, 4).select(col("id").cast(DoubleType).as("x")).repartition(3)
        val stage = new PythonStage().setStageName("scale").setParams(Map("factor" -> 2.0))
        val (out, during) = jobsDuring(stage.transform(df))
        assert(during.isEmpty, (aqe, during))
        assert(out.collect().map(_.getDouble(0)).sorted.toSeq == (0 until 1000).map(_ * 2.0), aqe)
        assert(out.count() == 1000)
        // First built inside another shuffle of the output (under AQE, on that query's stage thread).
        val byRemainder = stage.transform(df).groupBy((col("y") % 4).as("m")).count().collect()
        assert(byRemainder.map(r => r.getDouble(0) -> r.getLong(1)).toMap == Map(0.0 -> 500L, 2.0 -> 500L), aqe)
      }
    }
  }

  test("an unknown stage fails in transformSchema with UnknownStageException listing the stages") {
    val df = spark.range(3).toDF("x")
    val e = intercept[UnknownStageException] {
      new PythonStage().setStageName("no_such_stage").transformSchema(df.schema)
    }
    assert(e.stage == "no_such_stage")
    assert(e.getMessage.contains("no_such_stage") && e.getMessage.contains("identity"), e.getMessage)
  }

  test("bad params and bad columns fail in transformSchema, before data moves") {
    val df = spark.range(3).select(col("id").cast(DoubleType).as("x"))
    val zero = intercept[InvalidParamsException] {
      new PythonStage().setStageName("scale").setParams(Map("factor" -> 0)).transformSchema(df.schema)
    }
    assert(zero.stage == "scale" && zero.getMessage.contains("factor"), zero.getMessage)
    val missing = intercept[InvalidParamsException] {
      new PythonStage().setStageName("scale").transformSchema(df.schema)
    }
    assert(missing.getMessage.contains("factor"), missing.getMessage)
    val wrongType = intercept[InvalidParamsException] {
      new PythonStage().setStageName("scale").setParams(Map("factor" -> "big")).transformSchema(df.schema)
    }
    assert(wrongType.getMessage.contains("factor"), wrongType.getMessage)
    val noX = intercept[SchemaMismatchException] {
      new PythonStage().setStageName("scale").setParams(Map("factor" -> 2)).transformSchema(
        StructType(Seq(StructField("z", DoubleType))))
    }
    assert(noX.getMessage.contains("x"), noX.getMessage)
    val noCol = intercept[SchemaMismatchException] {
      new PythonStage().setStageName("identity").setInputCols(Array("nope")).transformSchema(df.schema)
    }
    assert(noCol.getMessage.contains("'nope'") && noCol.getMessage.contains("x"), noCol.getMessage)
    intercept[InvalidParamsException](new PythonStage().transformSchema(df.schema))
  }

  test("a raising stage fails the job with PythonStageException carrying the Python traceback") {
    val df = spark.range(10).select(col("id").cast(DoubleType).as("x"))
    val e = intercept[Exception] {
      new PythonStage().setStageName("raise_error").transform(df).collect()
    }
    val p = rootCause(e) match {
      case p: PythonStageException => p
      case other => fail(s"expected PythonStageException, got $other", other)
    }
    assert(p.stage == "raise_error")
    assert(p.pythonType == "ValueError")
    assert(p.pythonMessage == "boom")
    assert(p.getMessage.contains("Traceback (most recent call last)"), p.getMessage)
    assert(p.getMessage.contains("in deeper") && p.getMessage.contains("ValueError: boom"), p.getMessage)
    // The worker survives a raising stage and serves the next call.
    assert(new PythonStage().setStageName("identity").transform(df).count() == 10)
  }

  test("missing or wrong token -> AuthenticationException") {
    val lease = pool.borrow()
    val port = try lease.worker.get.port finally lease.close()
    for (token <- Seq("wrong-token", null)) {
      val c = WorkerClient.connect("127.0.0.1", port, token, conf)
      try {
        val e = intercept[AuthenticationException](c.listStages())
        assert(e.getMessage.contains("token"), e.getMessage)
        intercept[AuthenticationException](c.describe("identity"))
        c.checkHealth() // the health service needs no token
      } finally c.close()
    }
    val good = WorkerClient.connect("127.0.0.1", port, WorkerPool.localToken, conf)
    try assert(good.listStages().nonEmpty) finally good.close()
  }

  test("a killed worker -> WorkerUnavailableException, and the pool starts a new one") {
    val lease = pool.borrow()
    val pid = lease.pid.get
    val proc = lease.worker.get.process
    proc.destroyForcibly()
    assert(proc.waitFor(10, TimeUnit.SECONDS))
    val e = intercept[WorkerUnavailableException](lease.client.listStages())
    assert(e.getMessage.contains("127.0.0.1"), e.getMessage)
    lease.close() // a dead worker is not returned to the idle set
    assert(!pool.pids.contains(pid))
    val again = pool.borrow()
    try {
      assert(again.pid.get != pid)
      assert(again.client.listStages().nonEmpty)
    } finally again.close()

    // An idle worker that dies is replaced transparently on the next borrow.
    val idlePids = pool.pids
    idlePids.foreach(p => ProcessHandle.of(p).ifPresent(h => { h.destroyForcibly(); () }))
    idlePids.foreach(p => ProcessHandle.of(p).ifPresent(h => { h.onExit().get(10, TimeUnit.SECONDS); () }))
    val df = spark.range(0, 100, 1, 2).select(col("id").cast(DoubleType).as("x"))
    assert(new PythonStage().setStageName("identity").transform(df).count() == 100)
    assert(pool.pids.intersect(idlePids).isEmpty)
  }

  test("a worker that cannot start reports its exit code and stderr") {
    val badConf = conf.copy(workerStages = Seq("no_such_module_for_ferry_tests"))
    val p = WorkerPool.get(badConf)
    try {
      val e = intercept[WorkerUnavailableException](p.borrow())
      assert(e.getMessage.contains("exit code"), e.getMessage)
      assert(e.getMessage.contains("no_such_module_for_ferry_tests"), e.getMessage)
    } finally p.stop()
    val noPython = intercept[WorkerUnavailableException](
      WorkerPool.get(conf.copy(python = "/nonexistent/python3")).borrow())
    assert(noPython.getMessage.contains(FerryConf.Python), noPython.getMessage)
  }

  test("a remote worker given by spark.ferry.worker.address: no local process, token required") {
    val dir = TestSpark.newDir("remote")
    val tokenFile = new java.io.File(dir, "token")
    java.nio.file.Files.write(tokenFile.toPath, "remote-secret".getBytes)
    val pb = new ProcessBuilder(TestSpark.python, "-m", "ferry", "worker", "--host", "127.0.0.1", "--port", "0",
      "--token-file", tokenFile.getAbsolutePath, "--stages", "tests.stages_for_tests")
    pb.environment().put("PYTHONPATH", TestSpark.repo)
    pb.redirectError(new java.io.File(dir, "worker.log"))
    val proc = pb.start()
    try {
      val out = new java.io.BufferedReader(new java.io.InputStreamReader(proc.getInputStream))
      val line = Iterator.continually(out.readLine()).find(l => l == null || l.startsWith("FERRY_WORKER_PORT=")).get
      assert(line != null, s"the worker did not start: ${WorkerPool.tail(new java.io.File(dir, "worker.log"), 20)}")
      val address = "127.0.0.1:" + line.stripPrefix("FERRY_WORKER_PORT=").trim
      val df = spark.range(0, 50, 1, 2).select(col("id").cast(DoubleType).as("x"))
      withConf(FerryConf.WorkerAddress -> address, FerryConf.WorkerTokenFile -> tokenFile.getAbsolutePath) {
        val ys = new PythonStage().setStageName("scale").setParams(Map("factor" -> 2)).transform(df)
          .collect().map(_.getDouble(0)).sorted
        assert(ys.toSeq == (0 until 50).map(_ * 2.0))
        assert(WorkerPool.get(FerryConf.get(spark)).size == 0)
      }
      withConf(FerryConf.WorkerAddress -> address, FerryConf.WorkerToken -> "not-the-token") {
        intercept[AuthenticationException](new PythonStage().setStageName("identity").transformSchema(df.schema))
      }
      withConf(FerryConf.WorkerAddress -> address) {
        val e = intercept[AuthenticationException](new PythonStage().setStageName("identity").transformSchema(df.schema))
        assert(e.getMessage.contains(FerryConf.WorkerToken), e.getMessage)
      }
    } finally {
      proc.destroy()
      proc.waitFor(10, TimeUnit.SECONDS)
    }
  }

  test("prestarted workers are handed to borrowers, never doubled") {
    val p = WorkerPool.get(conf.copy(workerLogDir = Some(TestSpark.newDir("prestart-pool").getAbsolutePath)))
    try {
      p.prestart(2)
      p.prestart(2) // already on their way: starts nothing more
      val a = p.borrow() // claims one that is still starting, or takes it from the idle set
      val b = p.borrow()
      try {
        assert(a.pid != b.pid)
        assert(p.size == 2, s"${p.size} workers for 2 borrowers")
        assert(a.client.listStages().nonEmpty && b.client.listStages().nonEmpty)
      } finally { a.close(); b.close() }
      assert(p.idleCount == 2)
    } finally p.stop()
  }

  test("workers idle for longer than spark.ferry.worker.idleTimeout are stopped; busy ones are not") {
    val p = WorkerPool.get(conf.copy(workerIdleTimeoutMs = 1500,
      workerLogDir = Some(TestSpark.newDir("idle-pool").getAbsolutePath)))
    try {
      val a = p.borrow()
      val b = p.borrow()
      val idleProc = a.worker.get.process
      a.close()
      assert(p.size == 2 && p.idleCount == 1)
      assert(idleProc.waitFor(20, TimeUnit.SECONDS), "an idle worker outlived its idle timeout")
      assert(p.size == 1 && p.idleCount == 0)
      // The lent-out worker is untouched however long it is busy, and a new borrower gets a fresh worker.
      assert(b.worker.get.process.isAlive && b.client.listStages().nonEmpty)
      b.close()
      val c = p.borrow()
      try assert(c.client.listStages().nonEmpty) finally c.close()
    } finally p.stop()
  }

  test("stopping a pool stops its worker processes") {
    val p = WorkerPool.get(conf.copy(workerLogDir = Some(TestSpark.newDir("stop-pool").getAbsolutePath)))
    val a = p.borrow()
    val b = p.borrow()
    val procs = Seq(a, b).map(_.worker.get.process)
    a.close()
    assert(p.size == 2 && p.idleCount == 1)
    p.stop()
    assert(procs.forall(pr => pr.waitFor(10, TimeUnit.SECONDS)), "a worker outlived its pool")
    b.close()
    assert(p.size == 0)
    intercept[WorkerUnavailableException](p.borrow())
  }

  test("save and load round trip") {
    val stage = new PythonStage().setStageName("scale").setParams(Map("factor" -> 3.0)).setInputCols(Array("x"))
    val path = new java.io.File(TestSpark.newDir("pystage"), "stage").getAbsolutePath
    stage.write.overwrite().save(path)
    val loaded = PythonStage.load(path)
    assert(loaded.uid == stage.uid)
    assert(loaded.getStageName == "scale")
    assert(Json.decodeObject(loaded.getParamsJson) == Json.decodeObject(stage.getParamsJson))
    assert(loaded.getInputCols.toSeq == Seq("x"))
    val df = spark.range(5).select(col("id").cast(DoubleType).as("x"))
    assert(loaded.transform(df).collect().map(_.getDouble(0)).sorted.toSeq == Seq(0.0, 3.0, 6.0, 9.0, 12.0))
  }

  test("a streaming DataFrame through PythonStage") {
    val input = MemoryStream[Double](Encoders.scalaDouble, spark)
    val df = input.toDF().toDF("x")
    val out = new PythonStage().setStageName("scale").setParams(Map("factor" -> 10)).transform(df)
    assert(out.isStreaming)
    val query = out.writeStream.format("memory").queryName("ferry_scaled").outputMode("append").start()
    try {
      input.addData(1.0, 2.0, 3.0)
      query.processAllAvailable()
      input.addData(4.5)
      query.processAllAvailable()
      val ys = spark.table("ferry_scaled").collect().map(_.getDouble(0)).sorted
      assert(ys.toSeq == Seq(10.0, 20.0, 30.0, 45.0))
    } finally query.stop()
  }

  test("no Arrow memory is held after the runs") {
    assert(arrowAllocated == 0L)
  }
}
