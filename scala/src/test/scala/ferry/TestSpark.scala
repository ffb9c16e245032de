package ferry

import java.io.File
import java.nio.file.Files

import org.apache.spark.sql.SparkSession
import org.scalatest.{BeforeAndAfterAll, Suite}

/**
 * One local[2] SparkSession for the whole test JVM (starting one costs 7-12 s here), with its
 * own temp directories, configured to launch real ferry workers from the repository's venv
 * (system property `ferry.python`, set by build.sbt from FERRY_PYTHON or `<repo>/.venv/bin/python`).
 */
object TestSpark {
  val repo: String = sys.props.getOrElse("ferry.repo", new File(".").getCanonicalPath)
  val python: String = sys.props.getOrElse("ferry.python", s"$repo/.venv/bin/python")

  lazy val tempDir: File = {
    val d = Files.createTempDirectory("ferry-test-").toFile
    sys.addShutdownHook(deleteRecursively(d))
    d
  }

  lazy val session: SparkSession = SparkSession.builder()
    .master("local[2]")
    .appName("ferry-tests")
    .config("spark.ui.enabled", "false")
    .config("spark.sql.shuffle.partitions", "4")
    .config("spark.sql.warehouse.dir", new File(tempDir, "warehouse").getAbsolutePath)
    .config("spark.sql.streaming.checkpointLocation", new File(tempDir, "checkpoints").getAbsolutePath)
    .config(FerryConf.Python, python)
    .config(FerryConf.WorkerStages, "tests.stages_for_tests")
    .config(FerryConf.WorkerPythonPath, repo)
    .config(FerryConf.WorkerLogDir, new File(tempDir, "worker-logs").getAbsolutePath)
    .getOrCreate()

  /** Runs a Python script in the venv with the repository on PYTHONPATH; its output, or a failed assertion. */
  def runPython(script: String): String = {
    val out = new StringBuilder
    val code = scala.sys.process.Process(Seq(python, "-c", script), None, "PYTHONPATH" -> repo,
      "OMP_NUM_THREADS" -> "1").!(scala.sys.process.ProcessLogger(l => out.append(l).append('\n'),
      l => out.append(l).append('\n')))
    assert(code == 0, s"python failed:\n$out")
    out.toString
  }

  def newDir(prefix: String): File = Files.createTempDirectory(tempDir.toPath, prefix).toFile

  def deleteRecursively(f: File): Unit = {
    if (f.isDirectory) Option(f.listFiles()).foreach(_.foreach(deleteRecursively))
    f.delete()
  }
}

/** Mixes the shared session into a suite and checks that no Arrow memory leaked after it. */
trait SparkSuite extends BeforeAndAfterAll { self: Suite =>
  lazy val spark: SparkSession = TestSpark.session

  /** Runs `body` with `spark.ferry.*` runtime settings, restoring the previous values after. */
  def withConf[T](settings: (String, String)*)(body: => T): T = {
    val old = settings.map { case (k, _) => k -> spark.conf.getOption(k) }
    settings.foreach { case (k, v) => spark.conf.set(k, v) }
    try body
    finally old.foreach {
      case (k, Some(v)) => spark.conf.set(k, v)
      case (k, None) => spark.conf.unset(k)
    }
  }

  /**
   * Runs `body` and returns its result with the Spark jobs that started while it ran (their
   * descriptions; a job without one gives ""). Marker jobs before and after delimit them, as
   * listener events arrive in order but later than the jobs.
   */
  def jobsDuring[T](body: => T): (T, Seq[String]) = {
    val jobs = new java.util.concurrent.ConcurrentLinkedQueue[String]()
    val listener = new org.apache.spark.scheduler.SparkListener {
      override def onJobStart(e: org.apache.spark.scheduler.SparkListenerJobStart): Unit =
        jobs.add(Option(e.properties).flatMap(p => Option(p.getProperty("spark.job.description"))).getOrElse(""))
    }
    def marker(name: String): Unit = {
      spark.sparkContext.setJobDescription(name)
      try spark.range(1).count() finally spark.sparkContext.setJobDescription(null)
    }
    spark.sparkContext.addSparkListener(listener)
    try {
      marker("ferry-before")
      val result = body
      marker("ferry-after")
      val deadline = System.nanoTime() + 30L * 1000000000L
      while (!jobs.contains("ferry-after") && System.nanoTime() < deadline) Thread.sleep(20)
      val seen = jobs.toArray.toSeq.map(_.toString)
      assert(seen.contains("ferry-before") && seen.contains("ferry-after"), seen)
      // A marker may be two jobs (under adaptive execution, its aggregate's shuffle is one).
      (result, seen.slice(seen.indexOf("ferry-before"), seen.indexOf("ferry-after")).filter(_ != "ferry-before"))
    } finally spark.sparkContext.removeSparkListener(listener)
  }

  def arrowAllocated: Long = ArrowBatches.rootAllocatorIfCreated.map(_.getAllocatedMemory).getOrElse(0L)

  override protected def afterAll(): Unit = {
    try {
      val leaked = arrowAllocated
      assert(leaked == 0L, s"Arrow memory leaked by ${suiteName}: $leaked bytes")
    } finally super.afterAll()
  }
}
